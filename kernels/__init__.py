"""Fused Triton kernels for Stable-Diffusion U-Nets and VAEs (inference).

* :func:`group_norm` -- GroupNorm (+ SiLU), NCHW or channels_last, split reduction for large groups.
* :func:`attention` -- FlashAttention-style forward for ``[batch, heads, seq, head_dim]``.
* :func:`patch` -- swaps both into a diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``; ``restore()``
  undoes it.

Triton is required.  Without a CUDA GPU the kernels run only under the Triton interpreter, which Triton
enables when ``TRITON_INTERPRET=1`` is set *before* this package is imported (tests do this in conftest).
"""

from .attention import TritonAttnProcessor, attention, attention_config, attention_reference
from .group_norm import GroupNormAct, group_norm, group_norm_config, group_norm_reference
from .patch import PatchHandle, SiLULinear, patch

__all__ = [
    "GroupNormAct",
    "PatchHandle",
    "SiLULinear",
    "TritonAttnProcessor",
    "attention",
    "attention_config",
    "attention_reference",
    "group_norm",
    "group_norm_config",
    "group_norm_reference",
    "patch",
]
