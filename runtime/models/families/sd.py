"""Stable Diffusion 1.x / 2.x (and the embedded Fashion-MNIST models, LCMs and inpainting U-Nets): one text
encoder, conditioning on its last hidden states."""

from __future__ import annotations

from .base import UNetFamily

SD = UNetFamily(
    name="sd",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                      "LatentConsistencyModelPipeline"),
    save_class="StableDiffusionPipeline",
    text_encoder_parts=("text_encoder",),
    index_extras={"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False, "image_encoder": [None, None]},
    scheduler_fixing_pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                "StableDiffusionInpaintPipeline"),
)  # fmt: skip
