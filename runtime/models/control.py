"""ControlNets: spatial control (edge maps, depth, poses) for the U-Net families, with the semantics of
diffusers' ``StableDiffusionControlNetPipeline`` and ``StableDiffusionXLControlNetPipeline``.

- :func:`load` reads ControlNet folders (or the embedded ``fashion-controlnet``) and checks that each fits the
  model; ``diffrt.load(model, controlnet=...)`` attaches them, and every backend runs them as graphs of their own
  (``controlnet_0``, ...; :mod:`diffrt.models.families.unet_control`).
- :func:`settings` checks a call's ``control_image``, ``controlnet_scale``, ``control_start``/``control_end``
  and ``guess_mode`` into a :class:`Control`; control images are resized as diffusers' control image
  processor does (PIL: Lanczos; arrays and tensors: nearest).
- :class:`ControlLoop` computes one loop's residuals: at model call ``i`` of ``n`` a ControlNet acts unless
  ``i / n < start`` or ``(i + 1) / n > end`` (diffusers' rule); the acting ControlNets' residuals are scaled
  (guess mode: by a ramp from 0.1 at the first residual to 1 at the mid block) and summed. The calls are counted
  on the host, so a captured loop records which ControlNets run at each call; the scales are tensors it reads.
- :func:`canny` makes an edge map with OpenCV (the ``control`` extra: ``opencv-python-headless``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.checks import number
from ..core.images import WIDE_MODES, repeat, to_tensor
from . import embedded, families

CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------------------------------------- loading
def load(sources, components, dtype=None) -> list:
    """The ControlNets ``sources`` (a folder, an embedded name, a loaded ``ControlNetModel``, ``"random"`` (the
    U-Net's encoder copied, random outputs: benchmarks), or a list of them) for ``components``, each checked
    against its U-Net; nothing is attached here."""
    model = families.model(components)
    if components.deployed:
        raise ValueError("a deployed export holds no U-Net module to attach a ControlNet to: load the model it was "
                         "exported from")  # fmt: skip
    items = list(sources) if isinstance(sources, list | tuple) else [sources]
    if not items:
        raise ValueError("controlnet= is an empty list: give a ControlNet folder (or several)")
    loaded, wanted = [], components.denoiser.dtype if dtype is None else dtype
    for item in items:
        module, where = _module(item, dtype, components.unet)
        model.check_controlnet(module, where)
        # nn.Module.to, not diffusers' override: that one warns about casting instead of reloading
        loaded.append(module if module.dtype == wanted else nn.Module.to(module, wanted))
    return loaded


RANDOM = "random"  # a ControlNet of the model's own architecture with random weights, for benchmarks


def _module(item, dtype, unet=None):
    """A ControlNet module and how to name it in messages."""
    if isinstance(item, nn.Module):
        return item.eval(), f"ControlNet {type(item).__name__}"
    if item == RANDOM:
        return random_controlnet(unet), "the random ControlNet"
    if isinstance(item, str) and item in embedded.CONTROLNETS:
        folder = embedded.adapter_folder(item)
    else:
        folder = _folder(item)
    import diffusers

    from ..core.files import read_json_object
    from .folders import load_model

    name = read_json_object(folder / "config.json").get("_class_name")
    model_class = getattr(diffusers, str(name), None)
    if model_class is None or "ControlNet" not in str(name):
        raise ValueError(f"{folder}/config.json names class {name!r}, which is no diffusers ControlNet")
    return load_model(model_class, folder, "ControlNet", dtype), f"ControlNet {folder}"


def random_controlnet(unet, seed: int = 0, std: float = 0.02):
    """diffusers' ControlNet initialisation from ``unet`` (its encoder copied) with seeded random weights (normal,
    ``std``) in place of the zero convolutions, so its residuals are not zero: the cost of a ControlNet of that
    size, no weights needed."""
    from diffusers import ControlNetModel

    if unet is None:
        raise ValueError("controlnet='random' copies a U-Net's encoder; this model has no U-Net")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet)
        with torch.no_grad():
            for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
                conv.weight.normal_(0, std)
    return controlnet.eval()


def _folder(path):
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"controlnet= takes folders, embedded names ({', '.join(embedded.CONTROLNETS)}) or "
                         f"ControlNetModel objects, got {type(path).__name__}")  # fmt: skip
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"ControlNet {path}: no such folder (a diffusers ControlNetModel folder holds "
                                f"{' and '.join(CONTROLNET_FILES)}; embedded: {', '.join(embedded.CONTROLNETS)})")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"ControlNet {folder} has no config.json: not a diffusers model folder")
    return folder


# ------------------------------------------------------------------------------------------ a call's control
@dataclass(frozen=True)
class Control:
    """One call's control, validated: per ControlNet its images [N, C, H, W] in [0, 1] at the call's size,
    scale, and the share of the model calls it acts in; guess mode."""

    images: tuple[torch.Tensor, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool = False

    def keeps(self, calls: int) -> list[tuple[bool, ...]]:
        """Per model call, which ControlNets act (diffusers' ``controlnet_keep``)."""
        return [tuple(not (i / calls < s or (i + 1) / calls > e) for s, e in zip(self.starts, self.ends, strict=True))
                for i in range(calls)]  # fmt: skip

    @property
    def key(self) -> tuple:
        """What a captured loop bakes in (the images and scales are its inputs)."""
        return (len(self.images), self.starts, self.ends, self.guess_mode)


def settings(count: int, control_image, scale, start, end, guess_mode, n: int, height: int, width: int):
    """The call's :class:`Control` for a model with ``count`` ControlNets (None when it has none and none is
    asked for), ``n`` images of ``height`` x ``width``; a ValueError naming the bad value otherwise."""
    if count == 0:
        if control_image is not None:
            raise ValueError("control_image was given but this pipeline has no ControlNet: load one with "
                             "diffrt.load(MODEL, controlnet=PATH)")  # fmt: skip
        return None
    if control_image is None:
        raise ValueError(f"this pipeline has {count} ControlNet(s): give control_image= (one picture per "
                         "ControlNet: an edge map, depth map, ...)")  # fmt: skip
    pictures = [control_image] if count == 1 else control_image
    if count > 1 and (not isinstance(pictures, list | tuple) or len(pictures) != count):
        got = len(pictures) if isinstance(pictures, list | tuple) else 1
        raise ValueError(f"control_image has {got} entr{'y' if got == 1 else 'ies'} for {count} ControlNets: give a "
                         "list with one picture (or one list of pictures) per ControlNet")  # fmt: skip
    if not isinstance(guess_mode, bool):
        raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
    scales = _per_controlnet("controlnet_scale", scale, count)
    starts, ends = _per_controlnet("control_start", start, count), _per_controlnet("control_end", end, count)
    for k, value in enumerate(scales):
        if value < 0:
            raise ValueError(f"controlnet_scale must be >= 0 (0 turns a ControlNet off), got {value:g}"
                             + (f" for ControlNet {k}" if count > 1 else ""))  # fmt: skip
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        which = f" (ControlNet {k})" if count > 1 else ""
        if not 0 <= s < e <= 1:
            raise ValueError(f"control_start and control_end must satisfy 0 <= start < end <= 1, got start {s:g} "
                             f"and end {e:g}{which}")  # fmt: skip
    images = tuple(control_images(p, n, height, width, f"control_image {k}" if count > 1 else "control_image")
                   for k, p in enumerate(pictures))  # fmt: skip
    return Control(images, scales, starts, ends, guess_mode)


def _per_controlnet(name: str, value, count: int) -> tuple[float, ...]:
    values = list(value) if isinstance(value, list | tuple) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values for {count} ControlNet(s): give one number, or one per "
                         "ControlNet")  # fmt: skip
    return tuple(number(name if count == 1 else f"{name} {k}", v) for k, v in enumerate(values))


def control_images(picture, n: int, height: int, width: int, what: str = "control_image") -> torch.Tensor:
    """Control pictures (PIL, arrays, tensors; one for every image or one per image) as [n, C, height, width]
    in [0, 1], resized as diffusers' control image processor does: PIL images with Lanczos, arrays and tensors
    by nearest-neighbour interpolation."""
    pictures = list(picture) if isinstance(picture, list | tuple) else [picture]
    tensors = []
    for item in pictures:
        if hasattr(item, "convert") and hasattr(item, "size"):  # PIL: resized as a picture, then to RGB
            from PIL import Image

            if item.size != (width, height):
                item = item.resize((width, height), resample=Image.LANCZOS)
            tensor = to_tensor(item, what)
        else:
            tensor = to_tensor(item, what)
            if tuple(tensor.shape[-2:]) != (height, width):
                tensor = torch.nn.functional.interpolate(tensor, size=(height, width))
        tensors.append(tensor)
    tensor = torch.cat(tensors)
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{what} values must be in [0, 1] (got {float(tensor.min()):g} to {float(tensor.max()):g})")
    return repeat(tensor, n, what)


def native_size(control_image, count: int) -> tuple[int, int] | None:
    """(height, width) of the first control picture (a call's size when it gives none), or None."""
    if control_image is None or count == 0:
        return None
    first = control_image if count == 1 else control_image[0]
    first = first[0] if isinstance(first, list | tuple) and first else first
    if hasattr(first, "size") and hasattr(first, "convert"):  # PIL: (width, height)
        return first.size[1], first.size[0]
    return tuple(to_tensor(first, "control_image").shape[-2:])


# ------------------------------------------------------------------------------------------------ the loop
class ControlLoop:
    """One denoising loop's ControlNet calls. ``keeps``: per model call, which ControlNets act; ``graphs`` their
    graph names; ``images`` per ControlNet [B, C, H, W] for the rows it sees (with guess mode and classifier-free
    guidance: the conditional half only); ``scales`` a float tensor [count]; ``ramp``: guess mode's weight of each
    residual (None: no guess mode); ``guided``: the model's batch is [unconditional, conditional];
    ``channels``: the latents' (a 9-channel U-Net's ControlNet sees those only); ``zeros(sample)``: zero
    residuals for a batch, when no ControlNet acts."""

    def __init__(self, keeps, graphs, images, scales, *, ramp, guided: bool, channels: int, zeros):
        self.keeps, self.graphs, self.images, self.scales = keeps, graphs, images, scales
        self.ramp, self.guided, self.channels, self.zeros = ramp, guided, channels, zeros
        self.call = 0

    def residuals(self, run, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> dict:
        """The summed, scaled residuals for the U-Net at this model call (zeros when no ControlNet acts)."""
        acting = self.keeps[min(self.call, len(self.keeps) - 1)]
        self.call += 1
        only_cond = self.ramp is not None and self.guided
        rows = slice(sample.shape[0] // 2, None) if only_cond else slice(None)
        inputs = {"sample": sample[rows, : self.channels], "timestep": timestep[rows],
                  **{k: v[rows] for k, v in conditioning.items() if k != "timestep_cond"}}  # fmt: skip
        total = None
        for k, graph in enumerate(self.graphs):
            if not acting[k]:
                continue
            out = run(graph, controlnet_cond=self.images[k], **inputs)
            weights = [self.scales[k]] * len(out) if self.ramp is None else self.ramp * self.scales[k]
            scaled = {name: value * w for (name, value), w in zip(out.items(), weights, strict=True)}
            total = scaled if total is None else {name: total[name] + value for name, value in scaled.items()}
        if total is None:
            return self.zeros(sample)
        if only_cond:  # diffusers feeds the unconditional half zeros
            total = {name: torch.cat([torch.zeros_like(value), value]) for name, value in total.items()}
        return total


# --------------------------------------------------------------------------------------------------- canny
CANNY_LOW, CANNY_HIGH = 100, 200  # the thresholds canny ControlNets are usually trained with


def canny_edges(grey, low: int = CANNY_LOW, high: int = CANNY_HIGH):
    """OpenCV's Canny edges of a uint8 grey array [H, W]: uint8, 255 on edges. Needs OpenCV (the ``control``
    extra: ``pip install 'diffrt[control]'``)."""
    from ..core.optional import require

    require("cv2", feature="canny edge maps")
    import cv2

    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low < high <= 1000):
        raise ValueError(f"canny thresholds must be integers with 0 <= low < high <= 1000, got {low!r}, {high!r}")
    return cv2.Canny(grey, low, high)


def canny(image, low: int = CANNY_LOW, high: int = CANNY_HIGH):
    """The Canny edge map of ``image`` (a PIL image, an array, a tensor or a file path) as an RGB PIL image:
    white edges on black, what canny ControlNets are trained on."""
    import numpy as np
    from PIL import Image

    from ..core.images import read_picture

    if isinstance(image, str | os.PathLike):
        image = read_picture(image, "canny image")
    if hasattr(image, "convert") and image.mode not in WIDE_MODES:
        grey = np.asarray(image.convert("L"))
    else:  # arrays, tensors and pictures of more than 8 bits: their range kept, then 8 bits for OpenCV
        grey = (to_tensor(image, "canny image").mean(1)[0] * 255).round().to(torch.uint8).numpy()
    edges = canny_edges(grey, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
