"""Canny edge maps of Fashion-MNIST images: what ``fashion-controlnet`` is trained on and what its benchmark
measures generated images against (the same thresholds both ways)."""

from __future__ import annotations

import torch

from ..control import CANNY_HIGH, CANNY_LOW, canny_edges


def edge_maps(images: torch.Tensor, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> torch.Tensor:
    """uint8 grey images [N, H, W] -> bool edge maps [N, H, W]."""
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"edge_maps takes uint8 images [N, H, W], got {images.dtype} {tuple(images.shape)}")
    return torch.stack([torch.from_numpy(canny_edges(image.numpy(), low, high) > 0) for image in images.cpu()])


def control_pictures(edges: torch.Tensor) -> torch.Tensor:
    """Edge maps [N, H, W] as ControlNet input: white edges on black, [N, 3, H, W] floats in [0, 1]."""
    return edges.float()[:, None].expand(-1, 3, -1, -1).contiguous()


def grey_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generated RGB images [N, 3, H, W] in [0, 1] as uint8 grey [N, H, W] (their edges are then comparable)."""
    return (images.float().mean(1) * 255).round().clamp(0, 255).to(torch.uint8)
