"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states, concatenated), the second one's
pooled embedding, and size/crop conditioning (``time_ids``) into the U-Net's added embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.graphspec import TensorSpec
from .base import UNetFamily


@dataclass(frozen=True)
class SDXLFamily(UNetFamily):
    def lora_options(self) -> dict:
        return {"unet_config": self.components.unet.config}  # kohya SDXL files name U-Net blocks as SGM does

    def denoiser_inputs(self) -> list[TensorSpec]:
        cfg = self.components.unet.config
        b = self._latent_dims()[0]
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = [TensorSpec("text_embeds", (b, pooled)), TensorSpec("time_ids", (b, 6), "float", 0.0, 1024.0)]
        inputs = super().denoiser_inputs()
        return inputs[:3] + added + inputs[3:]

    def encode(self, run, prompts, height, width, device, max_sequence_length=None) -> dict:
        outputs = self.run_text_encoders(run, prompts, device)
        pooled = [out["pooled"] for out in outputs if "pooled" in out][-1]  # the projected (second) encoder's
        # size/crop conditioning: original size, crop top-left, target size
        size = torch.tensor([height, width, 0, 0, height, width], device=device)
        return {
            "encoder_hidden_states": torch.cat([out["hidden"] for out in outputs], dim=-1),
            "text_embeds": pooled,
            "time_ids": size.to(pooled.dtype).expand(len(prompts), 6),
        }

    def unconditional(self, run, negatives, cond, height, width, device, max_sequence_length=None) -> dict:
        if negatives is None:
            # SDXL was trained with zeroed embeddings for empty prompts (force_zeros_for_empty_prompt)
            return {k: torch.zeros_like(v) if k != "time_ids" else v for k, v in cond.items()}
        return self.encode(run, negatives, height, width, device)


SDXL = SDXLFamily(
    name="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                      "StableDiffusionXLInpaintPipeline"),
    save_class="StableDiffusionXLPipeline",
    text_encoder_parts=("text_encoder", "text_encoder_2"),
    index_extras={"force_zeros_for_empty_prompt": True, "image_encoder": [None, None],
                  "feature_extractor": [None, None]},
    penultimate_hidden=True,
)  # fmt: skip
