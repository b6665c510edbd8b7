"""Schedules and grids against diffusers' own tables, and their input checks."""

import diffusers
import numpy as np
import pytest
import torch

from diffrt.core.schedules import Grid, VPSchedule, flow_grid, ve_grid, vp_grid, vp_timesteps

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize(
    "ours, config",
    [
        (VPSchedule.linear(), dict(beta_schedule="linear")),
        (VPSchedule.scaled_linear(), SD),
        (VPSchedule.cosine(), dict(beta_schedule="squaredcos_cap_v2")),
    ],
    ids=["linear", "scaled_linear", "cosine"],
)
def test_vp_schedules_match_diffusers(ours, config):
    theirs = diffusers.DDPMScheduler(**config).alphas_cumprod.double()  # diffusers builds these in float32
    assert ours.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "spacing, scheduler_class",
    [
        ("leading", diffusers.DDIMScheduler),
        ("trailing", diffusers.DPMSolverMultistepScheduler),
        ("linspace", diffusers.DPMSolverMultistepScheduler),
        ("trailing", diffusers.UniPCMultistepScheduler),
        ("linspace", diffusers.UniPCMultistepScheduler),
    ],
)
@pytest.mark.parametrize("n", [1, 3, 10, 25, 50])
def test_vp_timesteps_match_diffusers(spacing, scheduler_class, n):
    scheduler = scheduler_class(**SD, timestep_spacing=spacing, steps_offset=1)
    scheduler.set_timesteps(n)
    ours = vp_timesteps(1000, n, spacing, steps_offset=1)
    np.testing.assert_array_equal(ours.numpy(), scheduler.timesteps.numpy())


@pytest.mark.parametrize("sigmas", ["karras", "exponential"])
def test_vp_grid_spaced_sigmas_match_dpmsolver(sigmas):
    flag = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}[sigmas]
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD, **{flag: True})
    scheduler.set_timesteps(12)
    grid = vp_grid(VPSchedule.scaled_linear(), 12, sigmas=sigmas)
    np.testing.assert_allclose((grid.sigmas / grid.alphas).numpy(), scheduler.sigmas.double().numpy(), rtol=2e-5)
    # diffusers stores timesteps as int64, truncating the fractional exponential ones; diffrt keeps them exact
    atol = 1e-3 if sigmas == "karras" else 1.0
    np.testing.assert_allclose(grid.timesteps[:-1].numpy(), scheduler.timesteps.double().numpy(), atol=atol)


def test_vp_grid_shape_and_clean_end():
    grid = vp_grid(VPSchedule.scaled_linear(), 20)
    assert grid.steps == 20 and grid.alphas.numel() == 21
    assert grid.alphas[-1] == 1 and grid.sigmas[-1] == 0
    torch.testing.assert_close(grid.alphas[:-1] ** 2 + grid.sigmas[:-1] ** 2, torch.ones(20, dtype=torch.float64))
    assert grid.init_scale == 1.0


def test_ve_grid_is_karras():
    grid = ve_grid(5, 0.002, 80.0, 7.0)
    assert grid.sigmas[0] == pytest.approx(80.0) and grid.sigmas[-2] == pytest.approx(0.002)
    assert (grid.alphas == 1).all() and grid.init_scale == 80.0
    ramp = (grid.sigmas[:-1] ** (1 / 7)).numpy()
    np.testing.assert_allclose(np.diff(ramp), np.diff(ramp)[0])  # uniform in sigma^(1/rho)


def test_flow_grid_matches_diffusers_shift():
    grid = flow_grid(8, shift=3.0)
    assert grid.sigmas[0] == 1 and grid.alphas[0] == 0 and grid.sigmas[-1] == 0
    t = torch.linspace(1, 0, 9, dtype=torch.float64)
    torch.testing.assert_close(grid.sigmas, 3 * t / (1 + 2 * t))
    torch.testing.assert_close(grid.alphas + grid.sigmas, torch.ones(9, dtype=torch.float64))
    torch.testing.assert_close(grid.timesteps, grid.sigmas * 1000)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: vp_grid(VPSchedule.scaled_linear(), 0), "steps"),
        (lambda: vp_grid(VPSchedule.scaled_linear(), 4, spacing="uniform"), "spacing"),
        (lambda: vp_grid(VPSchedule.scaled_linear(), 4, sigmas="beta"), "sigmas"),
        (lambda: vp_grid(VPSchedule.linear(T=10), 11), "cannot take 11 steps"),
        (lambda: ve_grid(4, 1.0, 0.5), "sigma_min"),
        (lambda: flow_grid(4, shift=0.0), "shift"),
        (lambda: Grid([1.0, 1.0], [1.0], [1.0, 0.0]), "lengths differ"),
        (lambda: Grid([0.5, 1.0], [0.5, 0.0], [1.0, 0.0], init_scale=0.0), "init_scale"),
        (lambda: Grid([0.9, 0.5, 1.0], [0.4, 0.8, 0.0], [1, 2, 0]), "strictly decrease"),
        (lambda: Grid([0.5, float("nan")], [0.5, 0.0], [1, 0]), "non-finite"),
        (lambda: Grid([0.5, 1.0], [0.5, 0.0], [1, 0], kind="edm"), "kind"),
        (lambda: Grid([1.0], [0.0], [0.0]), "at least 2"),
        (lambda: VPSchedule(torch.tensor([0.9, 0.95])), "increase"),
    ],
)
def test_bad_grids_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()
