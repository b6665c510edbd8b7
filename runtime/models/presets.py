"""Benchmark-shaped presets: the published architectures of SD 1.5, SD 2.1, SDXL, SD3 Medium, SD3.5 Large,
FLUX.1-dev and FLUX.1-schnell (T5-XXL included), and tiny models of the SD, SD3 and FLUX shapes for tests.

Their weights are RANDOM (seeded): no weights can be downloaded here. They give the real compute and memory
of those models for benchmarks and tests, not meaningful images. The tokenizers have CLIP's (T5's)
vocabulary size and padding but split text into bytes (see :mod:`diffrt.core.text`). Before any weight is
allocated, the weights' size is worked out on the meta device and a preset that does not fit in the memory
free on the device it is built on is refused, naming both numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

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


_FLOW_VAE = dict(  # SD3's and FLUX.1's 16-channel VAE (scaling and shift factors differ per family)
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
               hidden_act="gelu", projection_dim=1280, max_position_embeddings=77, vocab_size=49408)  # fmt: skip
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
               relative_attention_max_distance=128, t5=True)  # fmt: skip
_SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
_SD3_VAE = {**_FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
_SD3_TEXT = [{**_CLIP_L, "with_projection": True}, {**_CLIP_G, "with_projection": True}, _T5_XXL]
_SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)  # fmt: skip
_FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
_FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56))  # fmt: skip
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                  hidden_act="quick_gelu", projection_dim=32, max_position_embeddings=77, vocab_size=1000,
                  bos_token_id=998, eos_token_id=999, pad_token_id=999)  # fmt: skip
_TINY_T5 = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=1000,
                feed_forward_proj="gated-gelu", t5=True)  # fmt: skip
_TINY_FLOW_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                      up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 16, 32, 32],
                      layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                      use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """Configs of one model family member; ``build`` instantiates them with seeded random weights."""

    name: str
    family: str  # a key of diffrt.models.families
    unet: dict | None
    vae: dict
    text_encoders: list[dict]  # CLIPTextConfig kwargs ("with_projection": True for CLIPTextModelWithProjection),
    # or T5Config kwargs with "t5": True
    scheduler: dict
    vocab_size: int = 49408
    default_size: int = 512
    notes: str = ""
    defaults: dict | None = None  # sampling defaults beyond diffrt.core.defaults.BUILTIN
    transformer: dict | None = None  # SD3Transformer2DModel / FluxTransformer2DModel kwargs (in place of unet)


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
    "sd3-medium": Preset(
        "sd3-medium", "sd3", None, _SD3_VAE, _SD3_TEXT, _SD3_SCHEDULER, default_size=1024,
        defaults={"steps": 28, "sampler": "euler", "guidance": 7.0}, transformer=_SD3_MEDIUM,
        notes="Stable Diffusion 3 Medium architecture (MMDiT 2B, CLIP-L + CLIP-G + T5-XXL), random weights",
    ),
    "sd35-large": Preset(
        "sd35-large", "sd3", None, _SD3_VAE, _SD3_TEXT, _SD3_SCHEDULER, default_size=1024,
        defaults={"steps": 28, "sampler": "euler", "guidance": 3.5},
        transformer={**_SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                     "qk_norm": "rms_norm"},
        notes="Stable Diffusion 3.5 Large architecture (MMDiT 8B with q/k RMSNorm, CLIP-L + CLIP-G + T5-XXL), "
              "random weights",
    ),
    "flux-dev": Preset(
        "flux-dev", "flux", None, {**_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        [_CLIP_L, _T5_XXL], _FLUX_DEV_SCHEDULER, default_size=1024, transformer=_FLUX,
        defaults={"steps": 28, "sampler": "euler", "guidance": 3.5, "max_sequence_length": 512},
        notes="FLUX.1-dev architecture (12B transformer with guidance embedding, CLIP-L + T5-XXL), random weights",
    ),
    "flux-schnell": Preset(
        "flux-schnell", "flux", None, {**_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        [_CLIP_L, _T5_XXL], dict(num_train_timesteps=1000, shift=1.0), default_size=1024,
        transformer={**_FLUX, "guidance_embeds": False},
        defaults={"steps": 4, "sampler": "euler", "guidance": 1.0, "max_sequence_length": 256},
        notes="FLUX.1-schnell architecture (12B timestep-distilled transformer, CLIP-L + T5-XXL), random weights",
    ),
    "tiny-sd3": Preset(
        "tiny-sd3", "sd3", None, {**_TINY_FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609},
        [{**_TINY_TEXT, "with_projection": True}, {**_TINY_TEXT, "with_projection": True}, _TINY_T5],
        _SD3_SCHEDULER, vocab_size=1000, default_size=64,
        transformer=dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                         pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16),
        defaults={"steps": 4, "sampler": "euler", "guidance": 5.0},
        notes="a tiny SD3-shaped model for tests, random weights",
    ),
    "tiny-flux": Preset(
        "tiny-flux", "flux", None, {**_TINY_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        [_TINY_TEXT, _TINY_T5], _FLUX_DEV_SCHEDULER, vocab_size=1000, default_size=64,
        transformer=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                         guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        defaults={"steps": 4, "sampler": "euler", "guidance": 3.5, "max_sequence_length": 32, "size": 64},
        notes="a tiny FLUX.1-dev-shaped model (guidance embedding) for tests, random weights",
    ),
}  # fmt: skip


def names() -> list[str]:
    return sorted(PRESETS)


# ------------------------------------------------------------------------------------ reduced-depth variants
# ``NAME:blocks=N[,M][:text_blocks=K]``: the published widths, heads, head dims and text lengths with fewer
# blocks, for the architectures that do not fit a 24 GB machine; the name says it in every output.
_BLOCK_KEYS = {"sd3": {"num_layers": "joint blocks"},
               "flux": {"num_layers": "double-stream blocks", "num_single_layers": "single-stream blocks"}}
_TEXT_LAYERS = ("num_hidden_layers", "num_layers")  # CLIP's, T5's


def is_preset(name) -> bool:
    """Whether ``name`` names a preset or a reduced-depth variant of one (its options are checked at load)."""
    return isinstance(name, str) and name.split(":", 1)[0] in PRESETS


def resolve(name: str) -> Preset:
    """The preset ``name``, or its reduced-depth variant: ``flux-dev:blocks=2,2`` (double-, single-stream
    blocks), ``sd35-large:blocks=2``, ``...:text_blocks=2`` (layers of each text encoder, T5-XXL's included)."""
    base, *options = name.split(":")
    if base not in PRESETS:
        raise ValueError(f"unknown preset {base!r}; presets: {', '.join(names())}")
    preset = PRESETS[base]
    if not options:
        return preset
    transformer, texts, notes = preset.transformer, list(preset.text_encoders), []
    for option in options:
        key, _, value = option.partition("=")
        counts = _counts(name, key, value)
        if key == "blocks":
            keys = _BLOCK_KEYS.get(preset.family)
            if keys is None or len(counts) != len(keys):
                allowed = f"{len(keys)} count(s): {', '.join(keys.values())}" if keys else "none (it fits whole)"
                raise ValueError(f"{name}: blocks= takes {allowed} for {base}")
            transformer = {**transformer, **dict(zip(keys, counts, strict=True))}
            notes.append(", ".join(f"{n} of {preset.transformer[k]} {label}"
                                   for (k, label), n in zip(keys.items(), counts, strict=True)))  # fmt: skip
        elif key == "text_blocks" and len(counts) == 1:
            texts = [_fewer_layers(cfg, counts[0]) for cfg in texts]
            notes.append(f"text encoders cut to {counts[0]} layers")
        else:
            raise ValueError(f"{name}: unknown preset option {option!r}; options: blocks=N[,M], text_blocks=K")
    note = (f"REDUCED DEPTH ({'; '.join(notes)}): the published widths, heads, head dims and text lengths, not its "
            f"compute or memory. {preset.notes}")  # fmt: skip
    return replace(preset, name=name, transformer=transformer, text_encoders=texts, notes=note)


def _counts(name: str, key: str, value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"{name}: {key} must be whole numbers >= 1 separated by commas, got {value!r}")
    return counts


def _fewer_layers(cfg: dict, layers: int) -> dict:
    key = next(k for k in _TEXT_LAYERS if k in cfg)
    return {**cfg, key: min(cfg[key], layers)}


def _text_model(cfg: dict):
    """A random text encoder and its tokenizer from a preset's config: CLIP (with or without projection) or T5."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..core.text import character_clip_tokenizer, character_t5_tokenizer

    cfg = dict(cfg)
    if cfg.pop("t5", False):
        return T5EncoderModel(T5Config(**cfg)).eval(), character_t5_tokenizer(cfg["vocab_size"])
    model_class = CLIPTextModelWithProjection if cfg.pop("with_projection", False) else CLIPTextModel
    tokenizer = character_clip_tokenizer(cfg["vocab_size"], cfg["max_position_embeddings"])
    return model_class(CLIPTextConfig(**cfg)).eval(), tokenizer


def _denoiser(preset: Preset):
    """The family's denoiser class (U-Net or transformer) with the preset's config."""
    import diffusers

    from . import families

    model_class = getattr(diffusers, families.get(preset.family).denoiser_classes[0])
    return model_class(**(preset.unet if preset.unet is not None else preset.transformer))


def parameter_counts(preset: Preset) -> dict[str, int]:
    """Each module's parameter count, from the modules built on the meta device: nothing is allocated."""
    denoiser, vae, encoders, _, _ = build_modules(preset, device="meta")
    names = [f"text_encoder_{k + 1}" if k else "text_encoder" for k in range(len(encoders))]
    modules = {"transformer" if preset.unet is None else "unet": denoiser, "vae": vae,
               **dict(zip(names, encoders, strict=True))}
    return {label: sum(p.numel() for p in m.parameters()) for label, m in modules.items()}


def weight_bytes(preset: Preset, dtype=None) -> dict[str, int]:
    """Bytes of each module's weights in ``dtype`` (default float32); nothing is allocated."""
    import torch

    itemsize = (dtype or torch.float32).itemsize
    return {label: count * itemsize for label, count in parameter_counts(preset).items()}


def check_fits(preset: Preset, dtype, device, free: int | None = None):
    """The dtype to build the weights in, after refusing (before allocating) a preset whose weights need more
    memory than ``device`` has free (``free``: that number in bytes, when the caller knows it).

    Weights are built in float32 and cast, so a preset has the same weights in every dtype; only where the
    float32 weights would not fit but the asked dtype's do (FLUX.1-dev in bfloat16 on a 40 GB GPU) are they
    built in that dtype directly, with a log line: those random weights differ from the float32 build's."""
    import torch

    from ..core import memory

    dtype = dtype or torch.float32
    counts = parameter_counts(preset)
    sizes = {label: count * dtype.itemsize for label, count in counts.items()}
    need, full = sum(sizes.values()), 4 * sum(counts.values())
    if full <= memory.CHECK_ABOVE:
        return torch.float32
    free, where = (free, "free") if free is not None else memory.available_bytes(torch.device(device))
    if full <= free:
        return torch.float32
    if need <= free:
        log.info("preset %r: built directly in %s (float32 would need %.1f GB, %.1f GB is %s); its random weights "
                 "differ from the float32 build's", preset.name, dtype, full / 1e9, free / 1e9, where)  # fmt: skip
        return dtype
    parts = ", ".join(f"{label} {size / 1e9:.1f} GB" for label, size in sizes.items())
    name = str(dtype).removeprefix("torch.")
    raise ValueError(f"preset {preset.name!r} in {name} needs {need / 1e9:.1f} GB for its weights ({parts}), "
                     f"but only {free / 1e9:.1f} GB is {where}: use a smaller dtype, a device with more memory "
                     "or a smaller preset")  # fmt: skip


def build_modules(preset: Preset, seed: int = 0, device=None, dtype=None):
    """Instantiate (denoiser, vae, text_encoders, tokenizers, scheduler) with seeded random weights, on
    ``device`` (default the CPU), built in ``dtype`` (default float32; see :func:`check_fits`).

    The weights come from torch's default generator seeded with ``seed`` inside ``torch.random.fork_rng``:
    the caller's global random state is the same afterwards as before (on another device the numbers differ
    from the CPU's, but are as reproducible)."""
    import diffusers
    import torch

    device = torch.device(device or "cpu")
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            denoiser = _denoiser(preset)
            vae = diffusers.AutoencoderKL(**preset.vae)
            encoders, tokenizers = zip(*(_text_model(cfg) for cfg in preset.text_encoders), strict=True)
        finally:
            torch.set_default_dtype(previous)
    if preset.unet is None:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**preset.scheduler)
    else:
        scheduler = diffusers.DDIMScheduler(**preset.scheduler, clip_sample=False, set_alpha_to_one=False,
                                            steps_offset=1)  # fmt: skip
    return denoiser.eval(), vae.eval(), list(encoders), list(tokenizers), scheduler


def load(preset: str | Preset, dtype=None, device=None) -> Components:
    """A preset (by name, a reduced-depth variant's name, or a :class:`Preset` of one's own) as Components with
    seeded RANDOM weights (in ``dtype`` when given), built on ``device`` (default the CPU) after checking that
    they fit there."""
    from ..core import defaults

    if not isinstance(preset, Preset):
        preset = resolve(preset)
    build_dtype = check_fits(preset, dtype, device or "cpu")
    log.warning("preset %r: %s", preset.name, preset.notes)
    denoiser, vae, encoders, tokenizers, scheduler = build_modules(preset, device=device, dtype=build_dtype)
    if dtype is not None and dtype != denoiser.dtype:
        for module in (denoiser, vae, *encoders):
            module.to(dtype)
    unet, transformer = (denoiser, None) if preset.unet is not None else (None, denoiser)
    values, sources = defaults.layered((f"the {preset.name} preset", preset.defaults))
    return Components(preset.name, preset.family, unet, vae, encoders, tokenizers, scheduler, random_weights=True,
                      defaults=values, transformer=transformer, default_sources=sources)  # fmt: skip
