"""Tiny random diffusers folders laid out as published checkpoints ship them: written by diffusers' own
``save_pretrained`` (no ``diffrt.json``), each with the scheduler its model family ships, from configs of
their own (not diffrt's presets).

``FOLDERS`` maps a name to (pipeline class, builder); ``build(name, folder)`` writes one. The schedulers are
the published checkpoints' ``scheduler_config.json`` settings (SD 1.5, SD 2.1, SD-Turbo, SDXL base, an
LCM, SD3, FLUX.1-dev and -schnell), the weights seeded and random.
"""

from __future__ import annotations

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffrt.core.text import character_clip_tokenizer, character_t5_tokenizer

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _clip(hidden: int, projection: int | None = None):
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden + 5, num_attention_heads=2,
                            num_hidden_layers=2, max_position_embeddings=77, vocab_size=1000, bos_token_id=998,
                            eos_token_id=999, pad_token_id=999, projection_dim=projection or hidden)  # fmt: skip
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval(), character_clip_tokenizer(1000)


def _t5(width: int):
    config = T5Config(d_model=width, d_ff=2 * width + 3, d_kv=8, num_heads=2, num_layers=2, vocab_size=1000,
                      feed_forward_proj="gated-gelu")  # fmt: skip
    return T5EncoderModel(config).eval(), character_t5_tokenizer(1000)


def _vae(latent_channels: int = 4, **config):
    return diffusers.AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                   down_block_types=["DownEncoderBlock2D"] * 4,
                                   up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=latent_channels,
                                   **config).eval()  # fmt: skip


def _unet(**config):
    return diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **{"cross_attention_dim": 24, **config},
    ).eval()  # fmt: skip


def _sd(scheduler, pipeline=diffusers.StableDiffusionPipeline, **unet):
    encoder, tokenizer = _clip(24)
    parts = dict(vae=_vae(scaling_factor=0.18215), text_encoder=encoder, tokenizer=tokenizer, unet=_unet(**unet),
                 scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if pipeline is diffusers.StableDiffusionPipeline:
        parts["image_encoder"] = None
    return pipeline(**parts)


def sd15_pndm():
    return _sd(diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False))


def sd21_ddim_v():
    return _sd(diffusers.DDIMScheduler(**SD_BETAS, prediction_type="v_prediction", clip_sample=False,
                                       set_alpha_to_one=False, steps_offset=1))  # fmt: skip


def sd_turbo_euler():
    return _sd(diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing"))


def sd_dpmpp_2m_karras():
    return _sd(diffusers.DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True, steps_offset=1))


def sd_euler_ancestral():
    """A stochastic scheduler: its steps draw noise (diffrt draws it as diffusers does by default)."""
    return _sd(diffusers.EulerAncestralDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1))


def lcm():
    """An LCM (LatentConsistencyModelPipeline, guidance embedding, LCMScheduler: noise between its steps)."""
    scheduler = diffusers.LCMScheduler(**SD_BETAS, original_inference_steps=50, set_alpha_to_one=True,
                                       steps_offset=1, timestep_scaling=10.0)  # fmt: skip
    return _sd(scheduler, diffusers.LatentConsistencyModelPipeline, time_cond_proj_dim=16)


def sdxl_euler_leading():
    one, tokenizer = _clip(16)
    two, tokenizer_2 = _clip(16, projection=8)
    unet = _unet(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4, transformer_layers_per_block=(1, 1))  # fmt: skip
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    return diffusers.StableDiffusionXLPipeline(vae=_vae(scaling_factor=0.13025), text_encoder=one,
                                               text_encoder_2=two, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                               unet=unet, scheduler=scheduler)  # fmt: skip


def sd3():
    one, tokenizer = _clip(16, projection=16)
    two, tokenizer_2 = _clip(16, projection=16)
    three, tokenizer_3 = _t5(48)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
        pos_embed_max_size=16,
    ).eval()  # fmt: skip
    vae = _vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=one, tokenizer=tokenizer, text_encoder_2=two, tokenizer_2=tokenizer_2, text_encoder_3=three,
        tokenizer_3=tokenizer_3,
    )  # fmt: skip


def _flux(guidance_embeds: bool, scheduler):
    clip, tokenizer = _clip(24)
    t5, tokenizer_2 = _t5(32)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                  use_post_quant_conv=False).eval()  # fmt: skip
    return diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                                  text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)  # fmt: skip


def flux_dev():
    return _flux(True, diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096))  # fmt: skip


def flux_schnell():
    return _flux(False, diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))


FOLDERS = {
    "sd15-pndm": sd15_pndm, "sd21-ddim-v": sd21_ddim_v, "sd-turbo-euler": sd_turbo_euler,
    "sd-dpmpp-2m-karras": sd_dpmpp_2m_karras, "sd-euler-ancestral": sd_euler_ancestral, "lcm": lcm,
    "sdxl-euler-leading": sdxl_euler_leading, "sd3": sd3, "flux-dev": flux_dev, "flux-schnell": flux_schnell,
}  # fmt: skip


def build(name: str, folder):
    """Write folder ``name`` of FOLDERS to ``folder`` with diffusers' save_pretrained (safetensors)."""
    with torch.random.fork_rng():
        torch.manual_seed(sorted(FOLDERS).index(name))
        pipeline = FOLDERS[name]()
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder
