"""The modules of one text-to-image model and the facts the pipeline reads off them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core import defaults as sampling_defaults


@dataclass
class Components:
    """A loaded model: its diffusers/transformers modules, scheduler (the training schedule and prediction
    type; sampling uses diffrt's samplers), family (a key of :mod:`diffrt.models.families`) and sampling defaults.

    The denoiser is ``unet`` (U-Net families) or ``transformer`` (SD3, FLUX.1); the other one is None."""

    name: str
    family: str
    unet: object
    vae: object
    text_encoders: list
    tokenizers: list
    scheduler: object
    random_weights: bool = False
    defaults: dict = field(default_factory=sampling_defaults.merged)
    path: Path | None = None
    transformer: object = None
    deployed: dict | None = None  # the verified manifest of the deployed export it came from (no torch modules)
    controlnets: list = field(default_factory=list)  # diffusers ControlNetModels feeding the U-Net (models.control)
    default_sources: dict = field(default_factory=dict)  # where each of ``defaults`` came from (diffrt.core.defaults)


    @property
    def denoiser(self):
        """The denoising network: the U-Net or the transformer."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def denoiser_name(self) -> str:
        """``unet`` or ``transformer``: the denoiser's folder name (and its label in weight fingerprints)."""
        return "unet" if self.unet is not None else "transformer"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def inpainting_unet(self) -> bool:
        """An inpainting U-Net takes latents + mask + masked-image latents (4 + 1 + 4 channels)."""
        return self.unet is not None and self.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def guidance_embedding_dim(self) -> int | None:
        """Width of the guidance-scale embedding of guidance-distilled (LCM) U-Nets, else None."""
        return None if self.unet is None else self.unet.config.get("time_cond_proj_dim") or None

    @property
    def prediction_type(self) -> str:
        if self.is_flow:
            return "flow"
        return self.scheduler.config.prediction_type

    @property
    def is_flow(self) -> bool:
        return class_name(self.scheduler).startswith("FlowMatch")

    @property
    def is_consistency(self) -> bool:
        return class_name(self.scheduler) == "LCMScheduler"


def class_name(part) -> str:
    """The diffusers/transformers class of a model part: its own, or the one a deployed export recorded for it
    (:mod:`diffrt.models.deployment` stands in config-only objects for the modules it does not build)."""
    return getattr(part, "class_name", None) or type(part).__name__
