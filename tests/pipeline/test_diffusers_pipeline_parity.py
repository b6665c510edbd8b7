"""The tiny folder through diffusers' own pipelines and through diffrt gives the same images (float32)."""

import diffusers
import numpy as np
import pytest
import torch

import diffrt

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _noise(seeds, shape):
    # diffrt draws image k's initial noise from a CPU generator seeded with seed k
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize(
    "scheduler",
    [
        diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE),
        diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, use_karras_sigmas=True, solver_order=3),
        diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="trailing"),
    ],
    ids=["dpmpp_2m", "dpmpp_3m_karras", "euler_trailing"],
)
def test_stable_diffusion_pipeline_parity(tiny_folder, scheduler):
    ours = diffrt.load(tiny_folder, device="cpu", dtype=torch.float32)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder, scheduler=scheduler, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, num_inference_steps=6, guidance_scale=5.0)
    latents = _noise([4, 5], (4, 8, 8))  # diffusers scales them by init_noise_sigma itself
    reference = theirs(["a red sneaker", "a blue coat"], latents=latents, output_type="np", **kw).images
    images = ours(["a red sneaker", "a blue coat"], steps=6, scheduler=scheduler, guidance=5.0, seed=[4, 5],
                  height=64, width=64, output_type="np")  # fmt: skip
    assert np.abs(images - reference).max() <= 1e-4


def _tiny_sdxl(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffrt.loading import Components, save_components
    from diffrt.text import character_clip_tokenizer

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=77, vocab_size=1000, bos_token_id=998, eos_token_id=999, pad_token_id=999)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                  latent_channels=4, sample_size=64, scaling_factor=0.13025)
    encoders = [
        CLIPTextModel(CLIPTextConfig(**text)),
        CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)),
    ]
    tokenizers = [character_clip_tokenizer(1000), character_clip_tokenizer(1000)]
    scheduler = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    parts = Components("tiny-sdxl", "sdxl", unet, vae, encoders, tokenizers, scheduler)
    return save_components(parts, tmp_path / "tiny-sdxl")
    # fmt: skip


def test_sdxl_folder_runs_and_matches_diffusers(tmp_path):
    folder = _tiny_sdxl(tmp_path)
    ours = diffrt.load(folder, device="cpu", dtype=torch.float32)
    assert ours.components.family == "sdxl"
    images = ours("a red sneaker", steps=3, seed=0, height=64, width=64, guidance=5.0, sampler="euler",
                  output_type="np")  # fmt: skip
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()

    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    latents = _noise([0], (4, 8, 8))
    reference = theirs("a red sneaker", latents=latents, height=64, width=64, num_inference_steps=3,
                       guidance_scale=5.0, output_type="np").images  # fmt: skip
    ours_same = ours("a red sneaker", steps=3, seed=0, height=64, width=64, guidance=5.0,
                     scheduler=theirs.scheduler, output_type="np")  # fmt: skip
    assert np.abs(ours_same - reference).max() <= 1e-4
