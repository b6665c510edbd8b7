"""Pictures in and out of a pipeline: PIL images, arrays and tensors to float tensors, and results back.

Input pictures (``image=``, ``mask_image=``) become float tensors [N, C, H, W]: images in [-1, 1] (the VAE's
range), masks as 0/1 (1 = repaint). Results leave as PIL images, numpy arrays or tensors in [0, 1].
"""

from __future__ import annotations

import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def to_tensor(picture, what: str) -> torch.Tensor:
    """PIL image / array / tensor (or a list of them) -> float tensor [N, C, H, W] in [0, 1]."""
    import numpy as np

    if hasattr(picture, "convert") and hasattr(picture, "size"):  # PIL
        mode = "L" if what == "mask_image" else "RGB"
        array = np.asarray(picture.convert(mode), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array)
        tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
    elif isinstance(picture, torch.Tensor | np.ndarray):
        tensor = torch.as_tensor(picture, dtype=torch.float32)
        tensor = tensor[None] if tensor.ndim == 3 else tensor
        if what == "mask_image" and tensor.ndim == 2:
            tensor = tensor[None, None]
        if tensor.ndim != 4:
            raise ValueError(f"{what} tensor must be [C, H, W] or [N, C, H, W], got shape {tuple(tensor.shape)}")
    elif isinstance(picture, list | tuple) and picture:
        return torch.cat([to_tensor(p, what) for p in picture])
    else:
        raise ValueError(f"{what} must be a PIL image, a tensor or an array, got {type(picture).__name__}")
    return tensor


def image_tensor(image, n: int, what: str = "image") -> torch.Tensor:
    """An RGB picture for ``n`` images, in [-1, 1]."""
    tensor = to_tensor(image, what)
    if tensor.shape[1] != 3:
        raise ValueError(f"{what} must have 3 channels (RGB), got {tensor.shape[1]}")
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{what} values must be in [0, 1]")
    return repeat(tensor, n, what) * 2 - 1


def mask_tensor(mask, n: int) -> torch.Tensor:
    """A one-channel mask for ``n`` images, thresholded to 0/1 (1 = repaint)."""
    tensor = to_tensor(mask, "mask_image")
    if tensor.shape[1] != 1:
        raise ValueError(f"mask_image must have 1 channel, got {tensor.shape[1]}")
    return (repeat(tensor, n, "mask_image") > 0.5).to(torch.float32)


def repeat(tensor: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if tensor.shape[0] == n:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(n, *tensor.shape[1:])
    raise ValueError(f"{what} has {tensor.shape[0]} pictures for {n} images")


def latent_mask(mask: torch.Tensor, factor: int, device) -> torch.Tensor:
    """A pixel mask [N, 1, H, W] at the latents' resolution (nearest: the mask stays 0/1)."""
    h, w = mask.shape[-2] // factor, mask.shape[-1] // factor
    return torch.nn.functional.interpolate(mask, size=(h, w), mode="nearest").to(device)


def convert(images: torch.Tensor, output_type: str):
    """Images [N, 3, H, W] in [0, 1] (or latents) as ``output_type``: pil, np (NHWC), pt, latent."""
    if output_type in ("latent", "pt"):
        return images.cpu()
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype("uint8")) for a in array]
