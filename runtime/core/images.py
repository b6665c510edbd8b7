"""Pictures in and out of a pipeline: PIL images, arrays and tensors to float tensors, and results back.

Input pictures (``image=``, ``mask_image=``) become float tensors [N, C, H, W]: images in [-1, 1] (the VAE's
range), masks as 0/1 (1 = repaint). As in diffusers, torch tensors are channels-first ([C, H, W] or
[N, C, H, W], floats in [0, 1]) and numpy arrays channels-last ([H, W, C] or [N, H, W, C]; uint8, or floats
in [0, 1]); a 2-D array or tensor is one grey picture. Image files are read by :func:`read_picture`, which
names the file when it is not an image. Results leave as PIL images, numpy arrays or tensors in [0, 1].
"""

from __future__ import annotations

import math
import os

import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CHANNELS = (1, 3, 4)  # of a numpy array: grey, RGB or RGBA (alpha dropped)
# PIL modes of more than 8 bits a channel (16-bit PNG/TIFF, 32-bit int and float images): read with their range,
# where PIL's convert("RGB") would clip every value to 8 bits
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def read_picture(path: str | os.PathLike, what: str = "image"):
    """A picture file as a PIL image, fully decoded now: a missing, unreadable or non-image file is a clear
    error naming it (PIL's own errors name neither the file nor what was expected)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{what} {path} is not an image file PIL can read (PNG, JPEG, WebP, ...): {err}") from err


def to_tensor(picture, what: str) -> torch.Tensor:
    """PIL image / array / tensor (or a list of them) -> float tensor [N, C, H, W] in [0, 1]."""
    import numpy as np

    if hasattr(picture, "convert") and hasattr(picture, "size") and picture.mode in WIDE_MODES:
        tensor = _wide_tensor(picture, what)  # grey: as RGB, as PIL converts an 8-bit grey picture
        tensor = tensor if what == "mask_image" else tensor.expand(-1, 3, -1, -1)
    elif hasattr(picture, "convert") and hasattr(picture, "size"):  # PIL
        mode = "L" if what == "mask_image" else "RGB"
        array = np.asarray(picture.convert(mode), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array)
        tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
    elif isinstance(picture, np.ndarray):
        tensor = _array_tensor(picture, what)
    elif isinstance(picture, torch.Tensor):
        tensor = picture.to(torch.float32)
        tensor = tensor[None, None] if tensor.ndim == 2 else tensor[None] if tensor.ndim == 3 else tensor
        if tensor.ndim != 4:
            raise ValueError(f"{what} tensor must be [H, W], [C, H, W] or [N, C, H, W] (channels first), "
                             f"got shape {tuple(picture.shape)}")  # fmt: skip
    elif isinstance(picture, list | tuple) and picture:
        return torch.cat([to_tensor(p, what) for p in picture])
    else:
        raise ValueError(f"{what} must be a PIL image, a tensor or an array, got {type(picture).__name__}")
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(tensor.shape)})")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} has non-finite values (NaN or inf)")
    return tensor


def _wide_tensor(picture, what: str) -> torch.Tensor:
    """A one-channel PIL picture of more than 8 bits (WIDE_MODES) as [1, 1, H, W] in [0, 1], its range kept:
    16-bit values over 65535, float ones as they are (which must be in [0, 1])."""
    import numpy as np

    full = WIDE_MODES[picture.mode]
    values = np.asarray(picture, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > full:
        raise ValueError(f"{what} is a {picture.mode} image with values {low:g} to {high:g}; diffrt reads "
                         f"{picture.mode} pictures as 0 to {full:g} (convert it to 8-bit RGB or scale it)")  # fmt: skip
    return torch.from_numpy((values / full).astype(np.float32))[None, None]


def _array_tensor(array, what: str) -> torch.Tensor:
    """A channels-last numpy array ([H, W], [H, W, C], [N, H, W, C]; uint8, uint16 or floats in [0, 1]) ->
    [N, C, H, W]."""
    import numpy as np

    if array.dtype == np.uint8:
        values = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:  # 16-bit pictures keep their 65536 levels
        values = (array.astype(np.float64) / 65535.0).astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_:
        values = array.astype(np.float32)
    else:
        raise ValueError(f"{what} array must be uint8, uint16 or float, got dtype {array.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    tensor = tensor[None, :, :, None] if tensor.ndim == 2 else tensor[None] if tensor.ndim == 3 else tensor
    if tensor.ndim != 4 or tensor.shape[-1] not in CHANNELS:
        raise ValueError(f"{what} array must be [H, W], [H, W, C] or [N, H, W, C] (channels last, as diffusers "
                         f"reads numpy arrays; C in {CHANNELS}), got shape {array.shape}")  # fmt: skip
    return tensor[..., :3].permute(0, 3, 1, 2)


def fit_size(height: float, width: float, step: int, minimum: int) -> tuple[int, int]:
    """A size rounded down to multiples of ``step``, at least ``minimum``."""
    def fit(value: float) -> int:
        return max(minimum, int(math.floor(value / step)) * step)

    return fit(height), fit(width)


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
    if tensor.shape[1] == 3:  # an RGB mask: its grey value, as PIL's "L" conversion
        tensor = (tensor * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
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
