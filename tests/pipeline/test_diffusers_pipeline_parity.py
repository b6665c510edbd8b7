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




def test_sdxl_folder_runs_and_matches_diffusers(tiny_sdxl_folder):
    folder = tiny_sdxl_folder
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
