"""What the fused SD3 and FLUX.1 blocks share: taking over a diffusers block's submodules, its adaLN modulation
chunks, the plain LayerNorms the kernels can replace, and the attention over a joint (text + image) sequence.

A fused block is a new module holding the original block's children under the same names: parameters are
shared (LoRA switches and state dicts reach them), the transformer calls it exactly as it called the original,
and :meth:`~diffrt.kernels.PatchHandle.restore` puts the original back.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention, head_dim_supported
from .qk_norm import rms_norm_rope


class FusedBlock(nn.Module):
    """A fused block: ``block``'s children under their own names (the same objects: nothing copied);
    ``original`` is its diffusers class, whose ``forward`` serves the calls the kernels do not cover."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.train(block.training)
        self.original = type(block)


def modulation(ada_norm: nn.Module, emb: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """diffusers' adaLN-Zero embedding: ``linear(silu(emb))`` cut into ``chunks`` [B, D] views."""
    return ada_norm.linear(ada_norm.silu(emb)).chunk(chunks, dim=1)


def plain_layer_norm(norm) -> bool:
    """A LayerNorm without weight or bias (adaLN's): the modulation kernels compute exactly that."""
    return isinstance(norm, nn.LayerNorm) and norm.weight is None and norm.bias is None


def qk_norm_problem(norm) -> str | None:
    """Why the query/key norm ``norm`` is not one the kernel computes (None, or an RMSNorm with a weight)."""
    if norm is None:
        return None
    if type(norm).__name__ != "RMSNorm" or getattr(norm, "bias", None) is not None:
        return f"query/key norm {type(norm).__name__} is not a plain RMSNorm"
    return None


def place(joint: torch.Tensor, part: torch.Tensor, norm, offset: int, rope=None) -> None:
    """Write ``part`` [B, L, H, D] into ``joint`` at token ``offset``: RMSNorm'd (``norm``: a diffusers RMSNorm or
    None) and rotated (``rope``) on the way, in one pass."""
    if norm is None:
        rms_norm_rope(part, None, rope=rope, norm=False, out=joint, offset=offset)
    else:
        rms_norm_rope(part, norm.weight, norm.eps, rope, out=joint, offset=offset)


def joint_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention over ``[B, L, H, D]`` buffers (read as ``[B, H, L, D]`` through their strides), returned as
    ``[B, L, H * D]`` (the kernel's output buffer is token-major: no transpose copy either way)."""
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def attention_problem(head_dim: int) -> str | None:
    if not head_dim_supported(head_dim):
        return f"head dim {head_dim} is not supported by the attention kernel"
    return None


__all__ = ["FusedBlock", "attention_problem", "joint_attention", "modulation", "place", "plain_layer_norm",
           "qk_norm_problem"]  # fmt: skip
