"""Swap the Triton kernels into a diffusers ``UNet2DConditionModel``, ``AutoencoderKL``, ``ControlNetModel``,
``FluxTransformer2DModel`` or ``SD3Transformer2DModel`` (and back).

What :func:`patch` changes (attributes of the model's submodules; parameters are shared, not copied, and
state-dict keys stay the same):

* The transformer blocks of FLUX.1 (double- and single-stream) and SD3/3.5 become fused blocks that hold the
  same submodules (:mod:`diffrt.kernels.flux_blocks`, :mod:`diffrt.kernels.sd3_blocks`): adaLN, gated
  residuals and the modulated norms in one pass each; their attention gets a Triton processor (query/key
  RMSNorm and rotary embedding written into the joint sequence, then the attention kernel). Blocks with
  weighted norms or chunked feed-forward, and processors other than diffusers' defaults, are left as they are
  and listed in ``PatchHandle.skipped``.

* GroupNorm followed by SiLU becomes one fused call, in the diffusers blocks whose ``forward`` applies the
  activation straight to the norm's output (checked against diffusers 0.42):

  - ``ResnetBlock2D`` with ``time_embedding_norm == "default"``: ``norm1`` and ``norm2`` become fused
    GroupNorm+SiLU. The block's ``nonlinearity`` also activates the time embedding before
    ``time_emb_proj``, so ``time_emb_proj`` becomes :class:`SiLULinear` (SiLU then the same Linear) and
    ``nonlinearity`` becomes an identity. (With ``"scale_shift"`` a scale and shift come between norm2 and
    the activation: such blocks only get plain Triton norms.)
  - ``UNet2DConditionModel`` and the VAE ``Encoder``/``Decoder``: ``conv_norm_out`` becomes fused and
    ``conv_act`` an identity (it is used nowhere else).
* Every other ``nn.GroupNorm`` (``Transformer2DModel.norm``, the VAE attention's ``group_norm``) becomes a
  plain :class:`GroupNormAct` (no activation).
* ``Attention`` modules whose processor is diffusers' default ``AttnProcessor2_0`` get a
  :class:`TritonAttnProcessor`; other processors (LoRA, IP-Adapter, custom) and head dims the kernel does not
  support (the SD VAE's 512) are left alone and listed in ``PatchHandle.skipped``.

:meth:`PatchHandle.restore` puts every original module and processor object back; the handle is also a
context manager.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from . import flux_blocks, sd3_blocks
from .attention import TritonAttnProcessor, head_dim_supported
from .group_norm import GroupNormAct

TRANSFORMER_PROCESSORS = (flux_blocks.TritonFluxAttnProcessor, sd3_blocks.TritonJointAttnProcessor)


class SiLULinear(nn.Linear):
    """``Linear(silu(x))`` sharing an existing Linear's parameters (same state-dict keys)."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> SiLULinear:
        wrapped = cls.__new__(cls)
        nn.Module.__init__(wrapped)
        wrapped.in_features, wrapped.out_features = linear.in_features, linear.out_features
        wrapped.weight, wrapped.bias = linear.weight, linear.bias
        wrapped.train(linear.training)
        return wrapped

    def forward(self, x):
        return super().forward(F.silu(x))


class PatchHandle:
    """What :func:`patch` changed; ``restore()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._swaps: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original child)
        self._processors: list[tuple[nn.Module, object]] = []  # (Attention, original processor)
        self.fused_norms = 0
        self.plain_norms = 0
        self.attention_processors = 0
        self.fused_blocks = 0
        self.skipped: list[str] = []
        self.restored = False

    def _swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self._swaps.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    def restore(self) -> None:
        """Put back the original modules and processors (idempotent)."""
        if self.restored:
            return
        for attn, processor in reversed(self._processors):
            attn.set_processor(processor)
        for parent, name, original in reversed(self._swaps):
            setattr(parent, name, original)
        self._swaps.clear()
        self._processors.clear()
        self.restored = True

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def summary(self) -> dict:
        return {
            "fused_norms": self.fused_norms,
            "plain_norms": self.plain_norms,
            "attention_processors": self.attention_processors,
            "fused_blocks": self.fused_blocks,
            "skipped": list(self.skipped),
        }

    def __repr__(self) -> str:
        state = "restored" if self.restored else "active"
        return f"PatchHandle({type(self.module).__name__}, {state}, {self.summary()})"


def _fusion_plan(module: nn.Module) -> tuple[list[str], str | None, str | None]:
    """(norms to fuse with SiLU, the activation attribute that becomes an identity, a Linear fed by that
    activation elsewhere in forward, which takes the SiLU itself) for the diffusers blocks we know."""
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    if isinstance(module, ResnetBlock2D) and module.time_embedding_norm == "default":
        takes_act = "time_emb_proj" if module.time_emb_proj is not None and not module.skip_time_act else None
        return ["norm1", "norm2"], "nonlinearity", takes_act
    if isinstance(module, (UNet2DConditionModel, Encoder, Decoder)):
        return ["conv_norm_out"], "conv_act", None
    return [], None, None


def patch(module: nn.Module, *, fallback: bool = False) -> PatchHandle:
    """Swap fused Triton GroupNorm(+SiLU) modules and ``TritonAttnProcessor`` into ``module`` in place.

    ``fallback`` is handed to the new modules and processors: when True they use torch where the kernels
    cannot take an input (see :func:`diffrt.kernels.group_norm` / :func:`diffrt.kernels.attention`).
    Returns a :class:`PatchHandle`; ``handle.restore()`` or ``with patch(model): ...`` undoes the change.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"patch needs a torch.nn.Module (diffusers UNet2DConditionModel or AutoencoderKL), "
            f"got {type(module).__name__}"
        )
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    handle = PatchHandle(module)
    try:
        _patch_transformer_blocks(module, handle)
        modules = list(module.named_modules())
        # 1. GroupNorm -> SiLU pairs in known diffusers blocks.
        for _, parent in modules:
            norms, act_name, linear_name = _fusion_plan(parent)
            if not norms or type(getattr(parent, act_name, None)) is not nn.SiLU:
                continue
            if not all(type(getattr(parent, n, None)) is nn.GroupNorm for n in norms):
                continue
            if linear_name is not None and type(getattr(parent, linear_name)) is not nn.Linear:
                continue
            for norm_name in norms:
                fused = GroupNormAct.from_group_norm(getattr(parent, norm_name), activation="silu", fallback=fallback)
                handle._swap(parent, norm_name, fused)
                handle.fused_norms += 1
            if linear_name is not None:
                handle._swap(parent, linear_name, SiLULinear.wrap(getattr(parent, linear_name)))
            handle._swap(parent, act_name, nn.Identity())
        # 2. Every remaining GroupNorm -> plain Triton group norm.
        for _, parent in modules:
            for name, child in list(parent.named_children()):
                if type(child) is nn.GroupNorm:
                    handle._swap(parent, name, GroupNormAct.from_group_norm(child, None, fallback=fallback))
                    handle.plain_norms += 1
        # 3. Attention processors.
        for name, sub in modules:
            if not isinstance(sub, Attention) or isinstance(sub.processor, TRANSFORMER_PROCESSORS):
                continue
            processor = sub.processor
            if type(processor) is not AttnProcessor2_0:
                handle.skipped.append(f"{name}: processor {type(processor).__name__} left as is")
                continue
            head_dim = sub.inner_kv_dim // sub.heads
            if not head_dim_supported(head_dim):
                handle.skipped.append(f"{name}: head dim {head_dim} not supported by the kernel, kept SDPA")
                continue
            handle._processors.append((sub, processor))
            sub.set_processor(TritonAttnProcessor(fallback=fallback))
            handle.attention_processors += 1
    except Exception:
        handle.restore()
        raise
    return handle


def _patch_transformer_blocks(module: nn.Module, handle: PatchHandle) -> None:
    """FLUX.1 and SD3 blocks -> fused blocks, their attention -> the Triton processors (see the module docs)."""
    families = (flux_blocks, sd3_blocks)
    blocks = {name: (family, fused) for family in families for name, fused in family.BLOCKS.items()}
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind not in blocks:
                continue
            family, fused = blocks[kind]
            problem = family.fusable(child)
            if problem:
                handle.skipped.append(f"{parent_name}.{name}: {problem}")
                continue
            handle._swap(parent, name, fused(child))
            handle.fused_blocks += 1
    for name, sub in module.named_modules():
        family = next((f for f in families if f.claims(sub)), None)
        if family is None:
            continue
        problem = family.attn_problem(sub)
        if problem:
            handle.skipped.append(f"{name}: {problem}")
            continue
        handle._processors.append((sub, sub.processor))
        sub.set_processor(family.PROCESSOR(sub.processor))
        handle.attention_processors += 1


__all__ = ["PatchHandle", "SiLULinear", "patch"]
