"""One validation pass over a pipeline call's arguments: they become a :class:`Request`, or a ValueError
naming the bad value and what is allowed, before any work is done.

A value of the right type that cannot give a sensible image is refused too, naming the bound: zero or
negative sizes, seeds outside what a generator takes, guidance beyond ``MAX_GUIDANCE``, more steps than a
consistency model was distilled for, a strength that leaves no step. Pictures of another size than the
call's are resized to it, with a warning (as diffusers does).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace

import torch

from .. import samplers
from ..core import defaults, step_cache
from ..core.checks import integer, number, prompt_text, shown
from ..core.images import OUTPUT_TYPES, fit_size, image_tensor, mask_tensor
from ..core.schedules import SPACINGS
from ..models import control as controlnets
from ..models.components import class_name

log = logging.getLogger(__name__)

STEP_NOISE = ("diffusers", "device")  # see build
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_GUIDANCE = 100.0  # beyond this the guided prediction leaves the data range: saturated or non-finite images
MAX_STEPS = 1000  # a training schedule's timesteps: more steps revisit the same levels
MAX_IMAGES = 1024  # images in one call (generate_batches takes more, in the memory of one batch)
MAX_BATCHED_IMAGES = 1_000_000  # images one generate_batches call makes
USUAL_GUIDANCE = 30.0  # above this a warning: published models are sampled at 1-15


@dataclass(frozen=True)
class Rules:
    """What a call is checked against: the model's sampling defaults and the sizes its graphs run at."""

    defaults: dict
    size_step: int  # heights and widths are multiples of this (the VAE's factor)...
    min_size: int  # ...and at least this (the U-Net halves the latents once per down block but the last)
    default_size: int
    inpainting_unet: bool  # a 9-channel U-Net needs image= and mask_image=
    max_steps: int | None = None  # consistency models: the steps of the schedule they were distilled on
    guidance_distilled: bool = False  # guidance= is an input of the model (FLUX.1-dev): true_cfg= adds CFG
    max_sequence_length: int | None = None  # the T5 families: the most text tokens a call may ask for
    max_size: int | None = None  # the largest side the model's position embedding covers (SD3)
    controlnets: int = 0  # ControlNets attached to the model: a call gives each a control image
    scheduler: object = field(default=None, compare=False)  # the model's own: what sampler="scheduler" samples as


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
    true_cfg: float = 1.0  # guidance-distilled models: classifier-free guidance on top (1 = off)
    max_sequence_length: int | None = None  # T5 tokens (None: the family's default)
    guidance_distilled: bool = False
    cache: step_cache.CacheConfig | None = None  # a step cache (diffrt.core.step_cache); None: every call computed
    control: controlnets.Control | None = None  # the ControlNets' images and settings (diffrt.models.control)
    step_noise: str = "device"  # where stochastic steps draw noise from (STEP_NOISE)

    @property
    def cfg_scale(self) -> float:
        """The classifier-free guidance scale: ``guidance``, or ``true_cfg`` where guidance is a model input."""
        return self.true_cfg if self.guidance_distilled else self.guidance

    @property
    def guidance_on(self) -> bool:
        """Classifier-free guidance at 0 or 1 runs the conditional pass only."""
        return self.cfg_scale not in (0.0, 1.0)


def build(
    rules: Rules, prompt, negative_prompt=None, *, steps: int | None = None, sampler: str | None = None,
    guidance: float | None = None, guidance_rescale: float = 0.0, seed=None, num_images: int | None = None,
    height: int | None = None, width: int | None = None, output_type: str = "pil", image=None,
    strength: float | None = None, mask_image=None, overlay: bool = True, spacing: str | None = None,
    scheduler=None, progress: bool | None = None, true_cfg: float = 1.0, max_sequence_length: int | None = None,
    cache=None, control_image=None, controlnet_scale=1.0, control_start=0.0, control_end=1.0,
    guess_mode: bool = False, step_noise: str | None = None, **sampler_options,
) -> Request:  # fmt: skip
    """Check a call's arguments and fill in the model's defaults.

    ``seed``: with an int seed s, image k uses seed s + k, so it is reproducible on its own (a list gives one
    seed per image; None draws one). ``guidance`` 0 or 1 runs the conditional U-Net pass only.
    ``sampler``: one of diffrt's samplers on the model's noise schedule, or ``"scheduler"``: the model's own
    diffusers scheduler reproduced exactly (a published folder's default: see :mod:`diffrt.core.defaults`).
    ``spacing`` places the timesteps (default: trailing for diffrt's samplers, which starts at the last training
    timestep as few-step sampling needs; the scheduler's own for ``"scheduler"``, which it overrides).
    ``scheduler``: a configured diffusers scheduler to reproduce exactly instead of ``sampler``/``spacing``.
    ``step_noise``: where stochastic steps (ancestral, SDE, LCM) draw their noise: ``"diffusers"``, each image's
    CPU generator continuing after its initial noise (after a posterior-sized draw for image-to-image), as
    diffusers' pipelines draw with ``generator=[torch.Generator().manual_seed(s) for s in seeds]``: the same
    numbers; or ``"device"``, generators on the model's device seeded apart (no host copy per step). Default:
    "diffusers" when sampling as a diffusers scheduler (``"scheduler"`` or ``scheduler=``), else "device".
    ``strength`` (default 0.8 for image-to-image, 1 for inpainting) 1 ignores the image's content
    (text-to-image from the same seed; with a mask, only the masked region is generated). ``mask_image``:
    white (1) = repaint, black (0) = keep; with ``overlay`` (default) the kept pixels are the input's own
    (the decoder would otherwise alter them slightly: its receptive field spans the whole image).
    ``output_type``: "pil", "np" or "pt" (images in [0, 1]) or "latent". ``sampler_options`` (eta=, order=,
    ...) go to the sampler. ``progress``: a progress bar (default: when stderr is a terminal).
    ``true_cfg``: for guidance-distilled models (FLUX.1-dev, whose ``guidance`` is an input of the model),
    classifier-free guidance on top with the negative prompt (empty by default); 1 = off.
    ``max_sequence_length``: T5 tokens for the transformer families (longer prompts are truncated, with a
    warning; default the family's: 256 for SD3, 512 for FLUX.1).
    ``cache``: a step cache, as a :class:`diffrt.core.step_cache.CacheConfig` or a string such as
    ``"deepcache:interval=3"`` (U-Nets) or ``"fbcache:threshold=0.1"`` (transformers); None computes every call.
    ``control_image``: with ControlNets loaded, one picture per ControlNet (a list for several; a picture may be
    a list of one per image); ``controlnet_scale``, ``control_start``, ``control_end`` (the share of the steps a
    ControlNet acts in) and ``guess_mode`` as in diffusers' ControlNet pipelines (see :mod:`diffrt.models.control`).
    The size defaults to the first control picture's when neither it nor ``image`` gives one.
    """
    prompts = _prompt_list(prompt, num_images, "prompt")
    n = len(prompts)
    negatives = None if negative_prompt is None else _prompt_list(negative_prompt, n, "negative_prompt")
    if scheduler is not None and sampler is not None:
        raise ValueError("give either sampler= or scheduler= (a diffusers scheduler to reproduce), not both")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if scheduler is not None and spacing is not None:
        raise ValueError("spacing= applies to diffrt's samplers; a scheduler= places its own timesteps (set its "
                         "timestep_spacing)")  # fmt: skip
    chosen = defaults.resolve(rules.defaults, steps=steps, sampler=sampler, guidance=guidance)
    steps, sampler, guidance = chosen["steps"], chosen["sampler"], chosen["guidance"]
    _check_steps(steps, rules.max_steps)
    if scheduler is None and sampler == defaults.SCHEDULER:
        scheduler = _own_scheduler(rules, spacing, sampler_options)
    elif scheduler is None and sampler not in samplers.available():
        raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(samplers.available())} or "
                         f"{defaults.SCHEDULER!r} (the model's own scheduler)")  # fmt: skip
    if step_noise is not None and step_noise not in STEP_NOISE:
        raise ValueError(f"step_noise must be one of {STEP_NOISE}, got {step_noise!r}")
    guidance = _check_guidance(guidance)
    guidance_rescale = number("guidance_rescale", guidance_rescale, 0, 1)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    seeds = _seed_list(seed, n)
    height, width = _check_size("height", height, rules), _check_size("width", width, rules)
    picture = None if image is None else image_tensor(image, n)
    mask = _mask(mask_image, picture, n, rules)
    if picture is not None:
        height, width = _picture_size(tuple(picture.shape[-2:]), height, width, rules)
        picture, mask = _fit("image", picture, height, width), _fit("mask_image", mask, height, width)
        strength = _check_strength(strength, steps, mask is not None)
    native = controlnets.native_size(control_image, rules.controlnets) if picture is None else None
    if native is not None and (height is None or width is None):
        height, width = _picture_size(native, height, width, rules)
    height, width = height or rules.default_size, width or rules.default_size
    control = controlnets.settings(rules.controlnets, control_image, controlnet_scale, control_start, control_end,
                                   guess_mode, n, height, width)  # fmt: skip
    _check_sampler_options(scheduler, sampler, steps, sampler_options)
    true_cfg = _check_true_cfg(true_cfg, rules)
    _check_sequence(max_sequence_length, rules)
    return Request(
        prompts, negatives, seeds, steps, sampler, sampler_options, float(guidance), float(guidance_rescale),
        height, width, output_type, picture, float(strength or 1.0), mask, spacing or "trailing", scheduler,
        sys.stderr.isatty() if progress is None else progress, bool(overlay), float(true_cfg), max_sequence_length,
        rules.guidance_distilled, step_cache.parse(cache), control,
        step_noise or ("diffusers" if scheduler is not None else "device"),
    )  # fmt: skip


def batch(req: Request, first: int, last: int) -> Request:
    """Images ``first`` to ``last - 1`` of a request, as a request of their own (same seeds, same settings)."""
    def rows(tensor):
        return None if tensor is None else tensor[first:last]

    negatives = None if req.negatives is None else req.negatives[first:last]
    control = req.control
    if control is not None:
        control = replace(control, images=tuple(rows(images) for images in control.images))
    return replace(req, prompts=req.prompts[first:last], negatives=negatives, seeds=req.seeds[first:last],
                   image=rows(req.image), mask=rows(req.mask), control=control)  # fmt: skip


def _own_scheduler(rules: Rules, spacing: str | None, options: dict):
    """The model's scheduler for sampler="scheduler" (with ``spacing``'s timesteps when given)."""
    if rules.scheduler is None:
        raise ValueError(f"sampler {defaults.SCHEDULER!r} needs a model with a diffusers scheduler")
    if options:
        raise ValueError(f"sampler options {sorted(options)} need a named sampler: sampler {defaults.SCHEDULER!r} "
                         f"samples exactly as the model's {class_name(rules.scheduler)} does")  # fmt: skip
    return rules.scheduler if spacing is None else samplers.with_spacing(rules.scheduler, spacing)


def _check_steps(steps, max_steps: int | None) -> None:
    integer("steps", steps, 1)
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be at most {MAX_STEPS} (a training schedule's timesteps), got {shown(steps)}")
    if max_steps is not None and steps > max_steps:
        raise ValueError(f"steps must be at most {max_steps} for this consistency model (it was distilled on a "
                         f"{max_steps}-step schedule; 1-8 steps is its use), got {steps}")  # fmt: skip


def _check_guidance(guidance) -> float:
    guidance = number("guidance", guidance, 0, MAX_GUIDANCE)
    if guidance > USUAL_GUIDANCE:
        log.warning("guidance %g is far above the usual 1-15: expect saturated images", guidance)
    return guidance


def _check_true_cfg(true_cfg, rules: Rules) -> float:
    true_cfg = number("true_cfg (1 = off)", true_cfg, 1, MAX_GUIDANCE)
    if true_cfg != 1 and not rules.guidance_distilled:
        raise ValueError("true_cfg applies to guidance-distilled models (FLUX.1-dev); for this model guidance= is "
                         "the classifier-free guidance scale itself")  # fmt: skip
    return true_cfg


def _check_sequence(length, rules: Rules) -> None:
    if length is None:
        return
    if rules.max_sequence_length is None:
        raise ValueError("max_sequence_length applies to models with a T5 text encoder (SD3, FLUX.1); this model's "
                         "prompts are padded to its tokenizer's length")  # fmt: skip
    integer("max_sequence_length", length, 1, rules.max_sequence_length)


def _check_size(name: str, value, rules: Rules) -> int | None:
    """None (the model's default, or the picture's size) or a multiple of the VAE factor, at least min_size."""
    if value is None:
        return None
    integer(name, value)
    if value % rules.size_step or value < rules.min_size:
        raise ValueError(f"{name} must be a multiple of {rules.size_step} and at least {rules.min_size}, "
                         f"got {value!r}")  # fmt: skip
    if rules.max_size is not None and value > rules.max_size:
        raise ValueError(f"{name} must be at most {rules.max_size} (what this model's position embedding covers), "
                         f"got {value}")  # fmt: skip
    return value


def _picture_size(size: tuple[int, int], height, width, rules: Rules) -> tuple[int, int]:
    """The call's size with an input picture of ``size`` (h, w): the one asked for, else the picture's own
    (rounded down to the size step), scaled down to the model's default size when it is more than twice that."""
    if height is not None and width is not None:
        return height, width
    h, w = size
    limit = 2 * rules.default_size
    scale = min(1.0, rules.default_size / max(h, w)) if max(h, w) > limit else 1.0
    if height is None and width is None:  # a picture far larger than the model's size: _fit says so
        return fit_size(h * scale, w * scale, rules.size_step, rules.min_size)
    if height is None:  # keep the picture's aspect ratio
        return fit_size(width * h / w, width, rules.size_step, rules.min_size)[0], width
    return height, fit_size(height, height * w / h, rules.size_step, rules.min_size)[1]


def _fit(what: str, picture: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
    """A picture resized to the call's size (area-weighted for images, nearest for masks), with a warning."""
    if picture is None or tuple(picture.shape[-2:]) == (height, width):
        return picture
    if picture.shape[0] > 1 and picture.stride(0) == 0:  # one picture for every image: resize it once
        return _fit(what, picture[:1], height, width).expand(picture.shape[0], -1, -1, -1)
    log.warning("%s is %dx%d: resized to %dx%d (give height= and width= for another size)", what,
                picture.shape[-1], picture.shape[-2], width, height)  # fmt: skip
    if what == "mask_image":
        return torch.nn.functional.interpolate(picture, size=(height, width), mode="nearest")
    resized = torch.nn.functional.interpolate(picture, size=(height, width), mode="bilinear", antialias=True,
                                              align_corners=False)  # fmt: skip
    return resized.clamp(-1, 1)


def _check_strength(strength, steps: int, inpainting: bool) -> float:
    """Strength defaults (0.8 image-to-image, 1 inpainting), bounds, and at least one step left to run."""
    if strength is None:
        strength = 1.0 if inpainting else 0.8
    strength = number("strength", strength, 0, 1, low_open=True)
    if int(steps * strength) < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run (steps x strength must "
                         f"be >= 1): raise either")  # fmt: skip
    return strength


def _mask(mask_image, picture, n: int, rules: Rules):
    if mask_image is None:
        if rules.inpainting_unet:
            raise ValueError("this is an inpainting U-Net (9 input channels): give image= and mask_image=")
        return None
    if picture is None:
        raise ValueError("mask_image needs image= (the picture to inpaint)")
    mask = mask_tensor(mask_image, n)
    if not mask.any():
        log.warning("mask_image is all black (keep everywhere): the image comes back unchanged")
    return mask


def _check_sampler_options(scheduler, sampler: str, steps: int, options: dict) -> None:
    """Options are checked now, before any heavy work (the grid is not needed to check names)."""
    if scheduler is None:
        from ..core.schedules import VPSchedule, vp_grid

        samplers.prepare(sampler, vp_grid(VPSchedule.scaled_linear(), steps), "cpu", torch.float32, **options)
    elif options:
        raise ValueError(f"sampler options {sorted(options)} cannot be combined with scheduler=")


def _prompt_list(prompt, num_images, what) -> list[str]:
    if num_images is not None:
        integer("num_images", num_images, 1, MAX_BATCHED_IMAGES)
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
    for text in dict.fromkeys(prompts):  # each distinct text once: a repeated prompt costs nothing
        prompt_text(what if len(prompts) == 1 else f"{what} {prompts.index(text)}", text)
    return prompts


def _seed_list(seed, n: int) -> list[int]:
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, list | tuple):
        if len(seed) != n:
            raise ValueError(f"seed list has {len(seed)} entries but {n} images were asked for")
        seeds = [integer("seed", s) for s in seed]
    else:
        first = integer("seed", seed)
        seeds = [first, first + n - 1] if first + n - 1 > MAX_SEED or first < 0 else [first + k for k in range(n)]
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seeds must be integers in [0, 2**64 - 1] (image k of seed s uses s + k), got "
                         f"{shown(bad[0])}")  # fmt: skip
    return seeds
