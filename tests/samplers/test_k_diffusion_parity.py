"""Parity with k-diffusion's samplers on a VE (Karras) grid, where k-diffusion is installed.

k-diffusion does not install cleanly on the project's machines (its package imports torchvision, which
pulls a CUDA build of torch), so these tests skip there; they run wherever k-diffusion imports.
"""

import pytest
import torch

from diffrt.core.schedules import ve_grid
from diffrt.samplers import sample

from .toy import toy_model

kd = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is not installed (it needs torchvision)")


def _denoiser(x, alpha, sigma, t):  # a VE denoiser built from the toy model: D = x - sigma * eps
    return x - sigma * toy_model(x, sigma)


def _k_model(x, sigma):
    return _denoiser(x, 1.0, sigma.view(-1, *[1] * (x.ndim - 1)), None)


@pytest.mark.parametrize("name, k_sampler", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                             ("dpmpp_2m", "sample_dpmpp_2m")])  # fmt: skip
@pytest.mark.parametrize("n", [2, 5, 12])
def test_matches_k_diffusion(name, k_sampler, n):
    grid = ve_grid(n, 0.002, 80.0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * grid.init_scale
    ours = sample(name, _denoiser, x, grid)
    theirs = getattr(kd, k_sampler)(_k_model, x, grid.sigmas.clone(), disable=True)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
