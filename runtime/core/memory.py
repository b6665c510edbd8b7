"""How much memory a pipeline call needs, estimated from the architecture before any work, and what the
device has free: a call that cannot fit is refused with both numbers instead of swapping or running for hours.

The estimate covers the activations of the largest stage, which run one after another: the U-Net (its skip
connections held for the up path, plus the working tensors of its widest level: resnet, attention with a
memory-efficient kernel, feed-forward), the VAE decoder (its full-resolution levels) and, for image-to-image,
the VAE encoder, plus the decoded images on the host, plus a fixed allowance (``OVERHEAD``) for the
allocator's slack and scratch buffers. It leaves out the weights (already loaded, so already
missing from what is free) and the text encoders (small, and independent of the image size). The
coefficients are upper bounds per element; ``tests/pipeline/test_memory.py`` checks them against peaks
measured on the presets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1024**3
# Area beyond which a size is refused whatever memory is free: 8x the trained side (64x its area). The model
# makes no sensible image that far out, and attention's work grows with the square of the area (hours of work
# in little memory, since attention kernels do not hold the score matrix).
MAX_AREA_FACTOR = 64
CHECK_ABOVE = 256 * 1024**2  # smaller estimates are not worth asking the device about
# live tensors per element of a level's width, measured against eager PyTorch (see the module docstring)
RESNET_TENSORS = 6  # input, norm, activation, conv, time-embedding sum, the skip concat on the up path
ATTENTION_TENSORS = 14  # norm, q, k, v, attention out, projection, the GEGLU feed-forward (8x wide)
DECODER_TENSORS = 7
TRANSFORMER_TENSORS = 16  # norm, modulated input, q, k, v, attention out, projection, gated sum, the 4x MLP
OVERHEAD = 128 * 1024**2  # allocator slack, scratch buffers and the text encoders' activations, measured


@dataclass(frozen=True)
class Estimate:
    stages: dict[str, int]  # bytes of each stage's activations

    @property
    def peak(self) -> int:
        return max(self.stages.values()) + OVERHEAD

    @property
    def largest(self) -> str:
        return max(self.stages, key=self.stages.get)


def _unet_bytes(config, batch: int, latent_h: int, latent_w: int, itemsize: int, residual_sets: int = 0) -> int:
    """The U-Net's skips and its widest level; ``residual_sets``: skip-sized ControlNet residuals held beside
    them (the running sum and one ControlNet's outputs)."""
    channels = list(config.block_out_channels)
    attention = ["CrossAttn" in kind or "Attn" in kind for kind in config.down_block_types]
    layers = config.layers_per_block if isinstance(config.layers_per_block, int) else max(config.layers_per_block)
    skips, widest = config.in_channels * latent_h * latent_w, 0
    for level, width in enumerate(channels):
        pixels = (latent_h >> level) * (latent_w >> level)
        skips += (layers + 1) * width * pixels
        per_element = ATTENTION_TENSORS if attention[level] else RESNET_TENSORS
        widest = max(widest, per_element * width * pixels)
    return batch * itemsize * ((1 + residual_sets) * skips + widest)


def _vae_bytes(config, batch: int, height: int, width: int, itemsize: int) -> int:
    channels = list(config.block_out_channels)  # the decoder runs them in reverse, ending at full resolution
    levels = len(channels)
    widest = 0
    for level, width_c in enumerate(channels):
        scale = 2 ** level
        pixels = (height // scale) * (width // scale)
        wider = channels[min(level + 1, levels - 1)]  # the upsampled input of this level is the next one's width
        widest = max(widest, (DECODER_TENSORS * width_c + wider) * pixels)
    return batch * itemsize * widest


def _transformer_bytes(config, batch: int, image_tokens: int, text_tokens: int, itemsize: int) -> int:
    """A transformer block's live tensors at its width: the joint sequence's norm, q/k/v, attention out and
    projection, the 4x-wide MLP (memory-efficient attention: no score matrix)."""
    width = config.num_attention_heads * config.attention_head_dim
    return batch * itemsize * TRANSFORMER_TENSORS * width * (image_tokens + text_tokens)


def estimate(components, *, batch: int, height: int, width: int, dtype_size: int, guided: bool,
             image_to_image: bool, tokens: tuple[int, int] | None = None, decode: bool = True) -> Estimate:  # fmt: skip
    """Activation bytes of one call of ``batch`` images at ``height`` x ``width`` (see the module docstring).
    ``tokens``: a transformer's (image, text) token counts at this size (its family's); ``decode``: False for a
    call that returns latents (no VAE decoder, no images)."""
    f = components.vae_scale_factor
    denoiser_batch = batch * (2 if guided else 1)
    if tokens is None:
        residuals = 2 if components.controlnets else 0  # a ControlNet runs before the U-Net: its residuals stay
        denoiser = ("U-Net", _unet_bytes(components.unet.config, denoiser_batch, height // f, width // f, dtype_size,
                                         residuals))  # fmt: skip
    else:
        denoiser = ("transformer", _transformer_bytes(components.transformer.config, denoiser_batch, *tokens,
                                                      dtype_size))  # fmt: skip
    stages = {denoiser[0]: denoiser[1]}
    if decode:
        stages["VAE decoder"] = _vae_bytes(components.vae.config, batch, height, width, max(dtype_size, 4))
        stages["images"] = batch * 3 * height * width * (4 + 4 + 1)  # float32 on the device, on the host, uint8
    if image_to_image:
        stages["VAE encoder"] = _vae_bytes(components.vae.config, batch, height, width, max(dtype_size, 4))
    return Estimate(stages)


def available_bytes(device) -> tuple[int, str]:
    """Memory free for new tensors on ``device`` and where the number comes from."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available to this machine (MemAvailable)"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free on this machine"


def check(components, device, *, batch: int, height: int, width: int, dtype_size: int, guided: bool,
          image_to_image: bool, trained_size: int, tokens: tuple[int, int] | None = None,
          batch_name: str = "batch", decode: bool = True) -> Estimate:  # fmt: skip
    """Refuse, before any work, a size more than ``MAX_AREA_FACTOR`` times the trained area (``trained_size``
    pixels a side), or a call whose estimated activations exceed what ``device`` has free. ``batch_name``: the
    setting that sets ``batch``, for the message."""
    found = estimate(components, batch=batch, height=height, width=width, dtype_size=dtype_size, guided=guided,
                     image_to_image=image_to_image, tokens=tokens, decode=decode)  # fmt: skip
    trained = trained_size
    need = (f"{batch} image(s) of {width}x{height} need about {found.peak / GIB:.2f} GiB for the {found.largest}'s "
            f"activations (estimated from the architecture; weights not counted)")  # fmt: skip
    if height * width > MAX_AREA_FACTOR * trained**2:
        raise ValueError(f"{width}x{height} is {height * width / trained**2:.0f}x the area this model was trained "
                         f"at ({trained}x{trained}); at most {MAX_AREA_FACTOR}x is run, since far beyond it the model "
                         f"gives no sensible image and the work grows with the area squared ({need})")  # fmt: skip
    if found.peak <= CHECK_ABOVE:
        return found
    free, where = available_bytes(device)
    if found.peak > free:
        fewer = f"a smaller {batch_name} or " if batch > 1 else ""
        raise ValueError(f"{need}, but only {free / GIB:.1f} GiB is {where}: use {fewer}a smaller size (this "
                         f"model's default is {trained} px)")  # fmt: skip
    return found
