"""What the flow-matching transformer families (SD3, FLUX.1) share: a ``transformer`` graph in place of the
U-Net, sizes set by the patch size, T5 sequence lengths, and flow grids from the scheduler's own timesteps
with the family's shift (diffusers' ``calculate_shift``: ``mu`` linear in the image's token count).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import T5_MAX_SEQUENCE, Family


def resolution_shift(tokens: int, config, max_shift_default: float) -> float:
    """``mu`` of the exponential (or linear) time shift for an image of ``tokens`` tokens: linear between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as FLUX.1 and SD3.5 compute it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift_default)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return tokens * slope + base_shift - slope * base_len


@dataclass(frozen=True)
class TransformerFamily(Family):
    """A flow-matching transformer family. Subclasses say how the transformer is called and conditioned."""

    denoiser_part: str = "transformer"
    default_sequence: int = 256  # T5 tokens when a call does not say (SD3: 256, FLUX.1-dev: 512)
    max_shift_default: float = 1.15  # the pipeline's max_shift when the scheduler config has none
    controlnet_classes: tuple[str, ...] = ()  # SD3ControlNetModel / FluxControlNetModel are not run yet

    def patch_size(self) -> int:
        raise NotImplementedError

    def size_multiple(self) -> int:
        return self.components.vae_scale_factor * self.patch_size()

    def size_step(self) -> int:
        return self.size_multiple()

    def default_size(self) -> int:
        size = self.components.defaults.get("size")  # an embedded model's trained size (its diffrt.json)
        if size:
            return int(size)
        sample = self.components.transformer.config.get("sample_size") or 128  # FLUX.1: the pipeline's 128 latents
        return sample * self.components.vae_scale_factor

    def image_tokens(self, height: int, width: int) -> int:
        f = self.size_multiple()
        return (height // f) * (width // f)

    def denoiser_tokens(self, height: int, width: int) -> tuple[int, int]:
        return self.image_tokens(height, width), self.sequence_length()

    def max_sequence_length(self) -> int | None:
        return T5_MAX_SEQUENCE

    def t5_length(self) -> int:
        """T5 tokens when a call does not say: the model's ``max_sequence_length`` default, else the family's."""
        return int(self.components.defaults.get("max_sequence_length") or self.default_sequence)

    def sequence_length(self) -> int:
        return self.t5_length()

    def uses_scheduler_grid(self) -> bool:
        return True

    def check_cache(self, config) -> None:
        if config.kind != "fbcache":
            raise ValueError(f"cache kind {config.kind!r} is for U-Nets; transformers ({self.name}) take fbcache")
        blocks = len(self.components.transformer.transformer_blocks)
        blocks += len(getattr(self.components.transformer, "single_transformer_blocks", ()))
        if blocks < 2:
            raise ValueError(f"fbcache needs a transformer of 2 or more blocks to skip; this one has {blocks}")

    def timestep_options(self, scheduler, steps: int, height: int, width: int) -> dict:
        """``mu`` for a scheduler with dynamic shifting (from this image's token count); the rest is the
        scheduler's own configuration (static shift, shift_terminal, karras/exponential/beta sigmas)."""
        config = scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        return {"mu": resolution_shift(self.image_tokens(height, width), config, self.max_shift_default)}
