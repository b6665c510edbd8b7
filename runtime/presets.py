"""Benchmark-shaped presets: the published architectures of SD 1.5, SD 2.1 and SDXL, and a tiny SD-shaped model.

Their weights are RANDOM (seeded): no weights can be downloaded here. They give the real compute and memory
of those models for benchmarks and tests, not meaningful images. The tokenizer has CLIP's vocabulary size and
77-token padding but splits text into bytes (see :func:`diffrt.text.character_clip_tokenizer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .components import Components

log = logging.getLogger(__name__)

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)

_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

_CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    hidden_act="quick_gelu", projection_dim=768, max_position_embeddings=77, vocab_size=49408,
)  # fmt: skip

_SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


@dataclass(frozen=True)
class Preset:
    """Configs of one model family member; ``build`` instantiates them with seeded random weights."""

    name: str
    family: str  # "sd" or "sdxl"
    unet: dict
    vae: dict
    text_encoders: list[dict]  # CLIPTextConfig kwargs; "with_projection": True for CLIPTextModelWithProjection
    scheduler: dict
    vocab_size: int = 49408
    default_size: int = 512
    notes: str = ""
    defaults: dict | None = None  # sampling defaults beyond diffrt.defaults.BUILTIN


PRESETS = {
    "sd15": Preset(
        "sd15", "sd", _SD15_UNET, _SD_VAE, [_CLIP_L], {**SD_SCHEDULE, "prediction_type": "epsilon"},
        notes="Stable Diffusion 1.5 architecture (UNet 860M, CLIP ViT-L/14 text encoder), random weights",
    ),
    "sd21": Preset(
        "sd21", "sd",
        {**_SD15_UNET, "sample_size": 96, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
         "use_linear_projection": True, "upcast_attention": True},
        {**_SD_VAE, "sample_size": 768},
        [dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
              hidden_act="gelu", projection_dim=512, max_position_embeddings=77, vocab_size=49408)],
        {**SD_SCHEDULE, "prediction_type": "v_prediction"},
        default_size=768,
        notes="Stable Diffusion 2.1 (768-v) architecture (OpenCLIP ViT-H text encoder), random weights",
    ),
    "sdxl": Preset(
        "sdxl", "sdxl",
        dict(sample_size=128, in_channels=4, out_channels=4,
             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
             transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816, norm_num_groups=32),
        {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        [_CLIP_L,
         dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              hidden_act="gelu", projection_dim=1280, max_position_embeddings=77, vocab_size=49408,
              with_projection=True)],
        {**SD_SCHEDULE, "prediction_type": "epsilon"},
        default_size=1024,
        notes="Stable Diffusion XL base architecture (UNet 2.6B, CLIP ViT-L + OpenCLIP bigG), random weights",
    ),
    "tiny": Preset(
        "tiny", "sd",
        dict(sample_size=8, in_channels=4, out_channels=4,
             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
             block_out_channels=[16, 32], layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
             norm_num_groups=8),
        dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
             up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 16, 32, 32], layers_per_block=1,
             latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.18215),
        [dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
              hidden_act="quick_gelu", projection_dim=32, max_position_embeddings=77, vocab_size=1000,
              bos_token_id=998, eos_token_id=999, pad_token_id=999)],
        {**SD_SCHEDULE, "prediction_type": "epsilon"},
        vocab_size=1000,
        default_size=64,
        notes="a tiny SD-shaped model (a few hundred thousand parameters) for tests, random weights",
        defaults={"steps": 4, "guidance": 5.0},
    ),
}  # fmt: skip


def names() -> list[str]:
    return sorted(PRESETS)


def build_modules(preset: Preset, seed: int = 0):
    """Instantiate (unet, vae, text_encoders, tokenizers, scheduler) with seeded random weights.

    The weights come from torch's default generator seeded with ``seed`` inside ``torch.random.fork_rng``:
    the caller's global random state is the same afterwards as before."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .text import character_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**preset.unet)
        vae = diffusers.AutoencoderKL(**preset.vae)
        encoders, tokenizers = [], []
        for cfg in preset.text_encoders:
            cfg = dict(cfg)
            model_class = CLIPTextModelWithProjection if cfg.pop("with_projection", False) else CLIPTextModel
            encoders.append(model_class(CLIPTextConfig(**cfg)).eval())
            tokenizers.append(character_clip_tokenizer(cfg["vocab_size"], cfg["max_position_embeddings"]))
    scheduler = diffusers.DDIMScheduler(**preset.scheduler, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return unet.eval(), vae.eval(), encoders, tokenizers, scheduler


def load(preset: str | Preset, dtype=None) -> Components:
    """A preset (by name, or a :class:`Preset` of one's own) as Components with seeded RANDOM weights (in
    ``dtype`` when given)."""
    from . import defaults

    if not isinstance(preset, Preset):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(names())}")
        preset = PRESETS[preset]
    log.warning("preset %r: %s", preset.name, preset.notes)
    unet, vae, encoders, tokenizers, scheduler = build_modules(preset)
    if dtype is not None and dtype != unet.dtype:
        for module in (unet, vae, *encoders):
            module.to(dtype)
    return Components(preset.name, preset.family, unet, vae, encoders, tokenizers, scheduler, random_weights=True,
                      defaults=defaults.merged(preset.defaults))  # fmt: skip
