"""What the denoising loop reads: :class:`LoopInputs` (tensors only: a captured loop's graph inputs) and
:class:`LoopSettings` (plain values: part of a captured loop's key). Built once per call; the eager loop and
the captured one both build their denoiser from them, so neither reaches into the call itself."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .. import samplers


@dataclass
class LoopInputs:
    """Every tensor the loop reads, and nothing else of the call."""

    x: torch.Tensor  # the starting state (scaled noise, or the noised image for image-to-image)
    cond: dict[str, torch.Tensor]  # the denoiser's conditioning inputs
    uncond: dict[str, torch.Tensor] | None = None  # ... and the unconditional branch's (classifier-free guidance)
    image_latents: torch.Tensor | None = None  # image-to-image / inpainting: the encoded picture
    repaint: torch.Tensor | None = None  # latent blending (4-channel U-Nets): 1 = generate
    unet_extra: torch.Tensor | None = None  # 9-channel inpainting U-Nets: [mask, masked-image latents]
    control_images: list[torch.Tensor] | None = None  # per ControlNet, the rows it sees (diffrt.models.control)
    control_scales: torch.Tensor | None = None  # [ControlNets] float32

    def flatten(self) -> dict[str, torch.Tensor]:
        """One name per tensor (``cond/encoder_hidden_states``, ``control_images/0``): a capture's buffers."""
        flat = {}
        for name in (f.name for f in fields(self)):
            value = getattr(self, name)
            if isinstance(value, dict):
                flat.update({f"{name}/{key}": tensor for key, tensor in value.items()})
            elif isinstance(value, list):
                flat.update({f"{name}/{k}": tensor for k, tensor in enumerate(value)})
            elif value is not None:
                flat[name] = value
        return flat

    @classmethod
    def unflatten(cls, flat: dict[str, torch.Tensor]) -> LoopInputs:
        """The inputs back from :meth:`flatten`'s names (over a capture's static copies)."""
        values: dict = {}
        for name, tensor in flat.items():
            field, _, key = name.partition("/")
            if not key:
                values[field] = tensor
            elif field == "control_images":
                values.setdefault(field, {})[int(key)] = tensor
            else:
                values.setdefault(field, {})[key] = tensor
        if "control_images" in values:
            values["control_images"] = [values["control_images"][k] for k in sorted(values["control_images"])]
        return cls(**values)


@dataclass(frozen=True)
class LoopSettings:
    """The plain values the loop's denoiser is built from (a captured loop's key holds them)."""

    guidance: float  # the classifier-free guidance scale applied (1: none)
    rescale: float  # guidance rescale
    calls: int  # model calls in the loop (a step cache and the ControlNets count them)
    cache: object = None  # the step cache's config (diffrt.core.step_cache), or None
    control: object = None  # the call's ControlNet settings (diffrt.models.control.Control), or None
    guided: bool = False  # the model's batch holds both halves of classifier-free guidance


def model_calls(plan: samplers.Plan) -> int:
    """How many times the loop calls the model: one per step, two on the steps of a second-order sampler."""
    return plan.levels.steps + sum(plan.static.get("second", []))
