"""FLUX.1's latent layout: 2x2 patches of the latent image packed into tokens, with the position ids its
rotary embedding reads. Torch only, no model: the FLUX family's graph, the ``fashion-dit`` trainer and the
tests share these.

A latent ``[B, C, h, w]`` becomes ``[B, (h/2)(w/2), 4C]`` (row-major patches, each ``C x 2 x 2`` flattened
channel-first), as diffusers' ``FluxPipeline`` packs it. Image ids are ``(0, row, col)`` per patch; text ids
are all zero. The packing is a permutation, so a sampler run on unpacked latents gives the same numbers.
"""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h*w/4, 4C]``."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, h*w/4, 4C]`` -> ``[B, C, h, w]`` (the inverse of :func:`pack`)."""
    b, _, packed = tokens.shape
    c = packed // 4
    patches = tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[h*w/4, 3]`` position ids ``(0, row, col)`` of the patches of an ``h x w`` latent."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)
    cols = torch.arange(w // 2, device=device, dtype=dtype)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([torch.zeros_like(grid_r), grid_r, grid_c], dim=-1).reshape(-1, 3)


def image_ids_like(latents: torch.Tensor) -> torch.Tensor:
    """:func:`image_ids` for ``latents [B, C, h, w]``, computed from the tensor itself (a cumulative sum over a
    strided slice) rather than from Python sizes, so a traced ONNX graph keeps them dynamic in h and w."""
    rows = torch.ones_like(latents[0, 0, ::2, 0]).cumsum(0) - 1
    cols = torch.ones_like(latents[0, 0, 0, ::2]).cumsum(0) - 1
    grid_r = rows[:, None] + 0 * cols[None, :]
    grid_c = cols[None, :] + 0 * rows[:, None]
    return torch.stack([torch.zeros_like(grid_r), grid_r, grid_c], dim=-1).reshape(-1, 3)


def text_ids_like(states: torch.Tensor) -> torch.Tensor:
    """:func:`text_ids` for text states ``[B, L, D]``, from the tensor (dynamic in L when traced)."""
    return torch.zeros_like(states[0, :, :3])


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[length, 3]`` zeros: FLUX gives every text token the same position."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def token_count(h: int, w: int) -> int:
    """Image tokens of an ``h x w`` latent (what FLUX's resolution shift reads)."""
    return (h // 2) * (w // 2)
