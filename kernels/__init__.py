"""Fused Triton kernels for Stable Diffusion U-Nets and VAEs, and the SD3 and FLUX.1 transformers (inference).

* :func:`group_norm` -- GroupNorm (+ SiLU), NCHW or channels_last, split reduction for large groups.
* :func:`attention` -- FlashAttention-style forward for ``[batch, heads, seq, head_dim]``.
* :func:`adaln_modulate`, :func:`gated_residual_adaln`, :func:`gated_residual` -- the adaLN LayerNorm and gated
  residuals of SD3 / FLUX.1 transformer blocks; :func:`rms_norm_rope` -- their query/key RMSNorm with FLUX's
  rotary embedding, into the joint sequence.
* :func:`patch` -- swaps them into a diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` / ``ControlNetModel``
  / ``FluxTransformer2DModel`` / ``SD3Transformer2DModel``; ``restore()`` undoes it.

Triton is required.  Without a CUDA GPU the kernels run only under the Triton interpreter, which Triton
enables when ``TRITON_INTERPRET=1`` is set *before* this package is imported (tests do this in conftest).
"""

import sys

if __name__ == "kernels":  # imported as a top-level package, not as diffrt.kernels: see below
    from os import path as _path

    def _hand_over_to_hub_kernels() -> None:
        """Python started in the repository root puts it on ``sys.path``, where this folder (``diffrt.kernels``)
        shadows Hugging Face's ``kernels`` package, which transformers imports: load that one in its place."""
        import importlib.machinery
        import importlib.util

        root = _path.dirname(_path.dirname(_path.abspath(__file__)))
        elsewhere = [p for p in sys.path if _path.abspath(p or ".") != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None:
            raise ImportError(f"no module named 'kernels' outside {root} (that folder is diffrt.kernels)")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds now
        spec.loader.exec_module(module)

    _hand_over_to_hub_kernels()
else:
    from .adaln import adaln_modulate, adaln_reference, gated_residual, gated_residual_adaln
    from .attention import TritonAttnProcessor, attention, attention_config, attention_reference
    from .group_norm import GroupNormAct, group_norm, group_norm_config, group_norm_reference
    from .patch import PatchHandle, SiLULinear, patch
    from .qk_norm import rms_norm_rope, rms_rope_reference

__all__ = [
    "GroupNormAct",
    "adaln_modulate",
    "adaln_reference",
    "gated_residual",
    "gated_residual_adaln",
    "rms_norm_rope",
    "rms_rope_reference",
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
