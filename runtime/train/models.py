"""Architectures of the Fashion-MNIST models (diffusers classes) and their training schedules.

Sizes ("full") are chosen so that three U-Nets, the VAE and the classifier fit in 30 MB as float16:
U-Net 3.23M parameters (6.5 MB), VAE 1.29M (2.6 MB), classifier 0.29M (0.6 MB).
The "tiny" variants keep the same classes and shapes (32x32x3 <-> 8x8x4) for smoke tests.
"""

from __future__ import annotations

import torch

LATENT_CHANNELS = 4
LATENT_SIZE = 8
IMAGE_CHANNELS = 3
IMAGE_SIZE = 32
NUM_TRAIN_TIMESTEPS = 1000
# The VP schedules of the eps model. "scaled_linear" (Stable Diffusion's betas, 0.00085..0.012) is the shipped
# one: it ends at alpha_bar = 4.7e-3 (signal scale 0.068), so an eps error near pure noise is amplified ~15x
# in the x0 estimate. DDPM's "linear" betas (1e-4..0.02) end at 4.0e-5 (signal scale 0.0064, ~156x): the first
# `fashion` runs on it gave x0 estimates ten times the data's scale from t = 999 and derailed every sampler.
VP_BETAS = {
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
}
LCM_COND_DIM = 128  # width of the guidance-scale embedding of the LCM student (timestep_cond)


def vae_config(size: str = "full") -> dict:
    """AutoencoderKL, 3 blocks: 32x32x3 <-> 8x8x4. The scaling factor is measured after training."""
    widths, groups, layers = ((32, 64, 64), 32, 2) if size == "full" else ((16, 16, 16), 8, 1)
    return dict(
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=list(widths),
        layers_per_block=layers,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=groups,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # placeholder until measured (1 / std of the training latents)
    )


def unet_config(size: str = "full", cross_attention_dim: int = 384) -> dict:
    """UNet2DConditionModel for 8x8x4 latents: cross-attention to the text tokens at 8x8, 4x4, 2x2 and in
    the middle; head width 32. (32, 64, 96) with one layer per block is 3.23M parameters."""
    if size == "full":
        widths, heads, groups = (32, 64, 96), (1, 2, 3), 32
        down = ["CrossAttnDownBlock2D"] * 3
        up = ["CrossAttnUpBlock2D"] * 3
    else:
        widths, heads, groups = (16, 32), (2, 2), 8
        down = ["CrossAttnDownBlock2D"] * 2
        up = ["CrossAttnUpBlock2D"] * 2
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(widths),
        layers_per_block=1,
        attention_head_dim=list(heads),  # diffusers' name for the number of heads per block
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=groups,
    )


def build_vae(size: str = "full"):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(size))


def build_unet(size: str = "full", **overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**unet_config(size), **overrides})


def eps_scheduler(beta_schedule: str = "scaled_linear"):
    """The ``fashion`` folder's scheduler: DPM-Solver++ (2M) on a VP schedule (``VP_BETAS``), trailing spacing.

    The diffrt pipeline only reads its training schedule (alphas_cumprod) and prediction type; diffusers'
    own pipeline samples with it, so it is the solver diffrt's default (dpmpp_2m, trailing) reproduces.
    ``steps_offset`` 1 (here and for the LCM scheduler) is unused by trailing spacing and by LCM's timesteps;
    diffusers' StableDiffusionPipeline warns about and rewrites any other value.
    """
    from diffusers import DPMSolverMultistepScheduler

    if beta_schedule not in VP_BETAS:
        raise ValueError(f"beta_schedule must be one of {tuple(VP_BETAS)}, got {beta_schedule!r}")
    return DPMSolverMultistepScheduler(
        **VP_BETAS[beta_schedule], num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", steps_offset=1,
    )  # fmt: skip


def flow_scheduler():
    """The ``fashion-flow`` folder's scheduler: rectified flow, Euler, no resolution shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)


def lcm_scheduler(teacher_config, original_inference_steps: int, timestep_scaling: float):
    """The ``fashion-lcm`` folder's scheduler: the teacher's betas; inference timesteps are a subset of the
    ``original_inference_steps``-point skipping schedule the student was distilled on."""
    from diffusers import LCMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    return LCMScheduler(
        **{k: teacher_config[k] for k in keys if k in teacher_config},
        original_inference_steps=original_inference_steps, timestep_scaling=timestep_scaling,
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1,
    )  # fmt: skip


def alphas_cumprod(scheduler) -> torch.Tensor:
    """The scheduler's own alpha_bar table (float64): training noises with exactly what sampling assumes."""
    return scheduler.alphas_cumprod.to(torch.float64)
