"""One validation pass over a pipeline call's arguments: they become a :class:`Request`, or a ValueError
naming the bad value and what is allowed, before any work is done."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from . import defaults, samplers
from .images import OUTPUT_TYPES, image_tensor, mask_tensor
from .schedules import SPACINGS


@dataclass(frozen=True)
class Rules:
    """What a call is checked against: the model's sampling defaults and the sizes its graphs run at."""

    defaults: dict
    size_step: int  # heights and widths are multiples of this (the VAE's factor)...
    min_size: int  # ...and at least this (the U-Net halves the latents once per down block but the last)
    default_size: int
    inpainting_unet: bool  # a 9-channel U-Net needs image= and mask_image=


@dataclass(frozen=True)
class Request:
    """One validated call."""

    prompts: list[str]
    negatives: list[str] | None
    seeds: list[int]
    steps: int
    sampler: str
    sampler_options: dict
    guidance: float
    guidance_rescale: float
    height: int
    width: int
    output_type: str
    image: torch.Tensor | None  # [N, 3, H, W] in [-1, 1]
    strength: float
    mask: torch.Tensor | None  # [N, 1, H, W], 1 = repaint
    spacing: str
    scheduler: object
    progress: bool
    overlay: bool

    @property
    def guidance_on(self) -> bool:
        """Guidance 0 or 1 runs the conditional U-Net pass only."""
        return self.guidance not in (0.0, 1.0)


def build(
    rules: Rules, prompt, negative_prompt=None, *, steps: int | None = None, sampler: str | None = None,
    guidance: float | None = None, guidance_rescale: float = 0.0, seed=None, num_images: int | None = None,
    height: int | None = None, width: int | None = None, output_type: str = "pil", image=None,
    strength: float | None = None, mask_image=None, overlay: bool = True, spacing: str = "trailing",
    scheduler=None, progress: bool | None = None, **sampler_options,
) -> Request:  # fmt: skip
    """Check a call's arguments and fill in the model's defaults.

    ``seed``: with an int seed s, image k uses seed s + k, so it is reproducible on its own (a list gives one
    seed per image; None draws one). ``guidance`` 0 or 1 runs the conditional U-Net pass only. ``spacing``
    places the timesteps (trailing starts at the last training timestep, which few-step sampling needs).
    ``scheduler``: a configured diffusers scheduler to reproduce exactly instead of ``sampler``/``spacing``.
    ``strength`` (default 0.8 for image-to-image, 1 for inpainting) 1 ignores the image's content
    (text-to-image from the same seed; with a mask, only the masked region is generated). ``mask_image``:
    white (1) = repaint, black (0) = keep; with ``overlay`` (default) the kept pixels are the input's own
    (the decoder would otherwise alter them slightly: its receptive field spans the whole image).
    ``output_type``: "pil", "np" or "pt" (images in [0, 1]) or "latent". ``sampler_options`` (eta=, order=,
    ...) go to the sampler. ``progress``: a progress bar (default: when stderr is a terminal).
    """
    prompts = _prompt_list(prompt, num_images, "prompt")
    n = len(prompts)
    negatives = None if negative_prompt is None else _prompt_list(negative_prompt, n, "negative_prompt")
    if scheduler is not None and sampler is not None:
        raise ValueError("give either sampler= or scheduler= (a diffusers scheduler to reproduce), not both")
    chosen = defaults.resolve(rules.defaults, steps=steps, sampler=sampler, guidance=guidance)
    steps, sampler, guidance = chosen["steps"], chosen["sampler"], chosen["guidance"]
    _check_steps(steps)
    if scheduler is None and sampler not in samplers.available():
        raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(samplers.available())}")
    if not isinstance(guidance, int | float) or not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    seeds = _seed_list(seed, n)
    picture = None if image is None else image_tensor(image, n)
    if picture is not None:
        height, width, strength = _image_settings(picture, height, width, strength, mask_image is not None)
    height = height or rules.default_size
    width = width or rules.default_size
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value % rules.size_step or value < rules.min_size:
            raise ValueError(
                f"{name} must be a multiple of {rules.size_step} and at least {rules.min_size}, got {value!r}"
            )
    mask = _mask(mask_image, picture, n, rules)
    _check_sampler_options(scheduler, sampler, steps, sampler_options)
    return Request(
        prompts, negatives, seeds, steps, sampler, sampler_options, float(guidance), float(guidance_rescale),
        height, width, output_type, picture, float(strength or 1.0), mask, spacing, scheduler,
        sys.stderr.isatty() if progress is None else progress, bool(overlay),
    )  # fmt: skip


def _check_steps(steps) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _image_settings(picture: torch.Tensor, height, width, strength, inpainting: bool):
    """Image-to-image: the size defaults to the picture's (and must match it); strength defaults and bounds."""
    height = height or picture.shape[-2]
    width = width or picture.shape[-1]
    if tuple(picture.shape[-2:]) != (height, width):
        raise ValueError(
            f"image is {picture.shape[-1]}x{picture.shape[-2]} (WxH) but height/width ask for {width}x{height}"
        )
    if strength is None:
        strength = 1.0 if inpainting else 0.8
    if not (isinstance(strength, int | float) and 0 < strength <= 1):
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    return height, width, strength


def _mask(mask_image, picture, n: int, rules: Rules):
    if mask_image is None:
        if rules.inpainting_unet:
            raise ValueError("this is an inpainting U-Net (9 input channels): give image= and mask_image=")
        return None
    if picture is None:
        raise ValueError("mask_image needs image= (the picture to inpaint)")
    mask = mask_tensor(mask_image, n)
    if tuple(mask.shape[-2:]) != tuple(picture.shape[-2:]):
        raise ValueError(
            f"mask_image is {mask.shape[-1]}x{mask.shape[-2]} but image is "
            f"{picture.shape[-1]}x{picture.shape[-2]}; they must match"
        )
    return mask


def _check_sampler_options(scheduler, sampler: str, steps: int, options: dict) -> None:
    """Options are checked now, before any heavy work (the grid is not needed to check names)."""
    if scheduler is None:
        from .schedules import VPSchedule, vp_grid

        samplers.prepare(sampler, vp_grid(VPSchedule.scaled_linear(), steps), "cpu", torch.float32, **options)
    elif options:
        raise ValueError(f"sampler options {sorted(options)} cannot be combined with scheduler=")


def _prompt_list(prompt, num_images, what) -> list[str]:
    if num_images is not None and (not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1):
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if isinstance(prompt, str):
        prompts = [prompt] * (1 if num_images is None else num_images)
    elif isinstance(prompt, list | tuple) and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
        if num_images is not None and len(prompts) != num_images:
            raise ValueError(f"{what} has {len(prompts)} entries but {num_images} images were asked for")
    else:
        raise ValueError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{what} list is empty")
    return prompts


def _seed_list(seed, n: int) -> list[int]:
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + k for k in range(n)]
    if isinstance(seed, list | tuple) and all(isinstance(s, int) for s in seed):
        if len(seed) != n:
            raise ValueError(f"seed list has {len(seed)} entries but {n} images were asked for")
        return list(seed)
    raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")
