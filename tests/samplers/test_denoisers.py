"""Prediction-type conversions, guidance and consistency scalings against closed forms (float64)."""

import pytest
import torch

from diffrt.core.denoisers import (
    consistency_denoiser,
    eps_denoiser,
    flow_denoiser,
    guided_model,
    prediction_denoiser,
    v_denoiser,
    x0_denoiser,
)


def _state(alpha, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 5, 7, dtype=torch.float64, generator=g)
    noise = torch.randn(3, 2, 5, 7, dtype=torch.float64, generator=g)
    a, s = torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    return x0, noise, a, s, a * x0 + s * noise


@pytest.mark.parametrize("alpha, sigma", [(0.8, 0.6), (0.05, 0.99875), (1.0, 0.0)])
def test_perfect_models_recover_x0(alpha, sigma):
    x0, noise, a, s, x = _state(alpha, sigma)
    t = torch.tensor(500.0)
    if sigma > 0:
        torch.testing.assert_close(eps_denoiser(lambda x, t: noise)(x, a, s, t), x0)
    torch.testing.assert_close(v_denoiser(lambda x, t: a * noise - s * x0)(x, a, s, t), x0)
    torch.testing.assert_close(x0_denoiser(lambda x, t: x0)(x, a, s, t), x0)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_flow_velocity_recovers_x0(t):
    x0, noise, a, s, x = _state(1 - t, t)
    torch.testing.assert_close(flow_denoiser(lambda x, tt: noise - x0)(x, a, s, None), x0)


def test_consistency_boundary_and_scalings():
    x0, noise, a, s, x = _state(0.6, 0.8)
    den = consistency_denoiser(lambda x, t: noise, timestep_scaling=10.0)
    # at t = 0 the boundary condition returns the input itself
    torch.testing.assert_close(den(x, a, s, torch.tensor(0.0, dtype=torch.float64)), x)
    t = torch.tensor(499.0, dtype=torch.float64)
    c_skip = 0.25 / ((4990.0) ** 2 + 0.25)
    c_out = 4990.0 / (4990.0**2 + 0.25) ** 0.5
    torch.testing.assert_close(den(x, a, s, t), c_skip * x + c_out * x0)
    with pytest.raises(ValueError, match="timestep"):
        den(x, a, s, None)


def test_guidance_is_one_batched_call_and_matches_formula():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return x * cond.view(-1, 1, 1, 1)

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    cond, uncond = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    out = guided_model(model, cond, uncond, scale=7.5)(x, torch.tensor(1.0))
    expected = x * 0.5 + 7.5 * (x * cond.view(-1, 1, 1, 1) - x * 0.5)
    torch.testing.assert_close(out, expected)
    assert calls == [4]
    calls.clear()
    guided_model(model, cond, uncond, scale=1.0)(x, torch.tensor(1.0))
    assert calls == [2]  # scale 1 skips the unconditional half


def test_guidance_rescale_matches_definition():
    def model(x, t, cond):
        return x * cond.view(-1, 1, 1, 1) + cond.view(-1, 1, 1, 1)

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    cond, uncond = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.1, 0.2], dtype=torch.float64)
    out = guided_model(model, cond, uncond, scale=5.0, rescale=0.7)(x, None)
    c, u = model(x, None, cond), model(x, None, uncond)
    g = u + 5.0 * (c - u)
    r = g * c.std(dim=(1, 2, 3), keepdim=True) / g.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, 0.7 * r + 0.3 * g)


def test_guidance_accepts_dict_conditioning():
    def model(x, t, cond):
        return x + cond["a"].view(-1, 1) * cond["b"].view(-1, 1)

    cond = {"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}
    uncond = {"a": torch.tensor([0.0]), "b": torch.tensor([0.0])}
    out = guided_model(model, cond, uncond, scale=3.0)(torch.zeros(1, 2), None)
    torch.testing.assert_close(out, torch.full((1, 2), 6.0))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: prediction_denoiser(lambda x, t: x, "noise"), "prediction"),
        (lambda: consistency_denoiser(lambda x, t: x, "velocity"), "prediction"),
        (lambda: guided_model(lambda x, t, c: x, 1, 0, scale=-1.0), "guidance scale"),
        (lambda: guided_model(lambda x, t, c: x, 1, 0, scale=2.0, rescale=1.5), "rescale"),
    ],
)
def test_bad_denoiser_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
