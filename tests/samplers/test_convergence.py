"""Samplers against an exact oracle: a Gaussian mixture with a closed-form denoiser (diffrt.bench.gmm).

Deterministic samplers must converge to the probability-flow ODE solution at their nominal order; stochastic
ones must reproduce the mixture's moments; no sampler may synchronise with the host. The oracle itself is
checked first (denoiser vs Monte Carlo, reference ODE vs a closed-form flow).
"""

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffrt.bench.gmm import GaussianMixture, gmm_2d, gmm_64d
from diffrt.core.schedules import ve_grid
from diffrt.samplers import available, sample

# 5 standard errors: the chance that sampling noise alone breaks one bound is ~6e-7.
Z = 5.0

MIXTURES = {"2d": gmm_2d, "64d": gmm_64d}


# --------------------------------------------------------------------------------------------- the oracle


def test_denoiser_matches_monte_carlo_1d():
    """E[x0 | x] = E[x0 N(x; a x0, s^2)] / E[N(x; a x0, s^2)] over exact x0 draws (self-normalised MC)."""
    mix = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.5, 0.8])
    x0 = mix.sample(400_000, torch.Generator().manual_seed(0))[:, 0]
    for alpha, sigma in ((1.0, 0.5), (0.8, 0.6), (0.3, 1.0), (0.0, 1.0)):
        for x in (-2.5, -0.3, 0.4, 2.0):
            w = torch.exp(-0.5 * ((x - alpha * x0) / sigma) ** 2)
            w = w / w.sum()
            estimate = (w * x0).sum()
            se = ((w**2 * (x0 - estimate) ** 2).sum()).sqrt()  # delta-method SE of a self-normalised mean
            exact = mix(torch.tensor([[x]], dtype=torch.float64), alpha, sigma, None)[0, 0]
            assert abs(exact - estimate) <= Z * se + 1e-12, (alpha, sigma, x, exact, estimate, se)


def test_denoiser_at_alpha_zero_is_prior_mean_and_dtypes_agree():
    mix = gmm_64d()
    x = torch.randn(16, 64, dtype=torch.float64)
    zero, one = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(mix(x, zero, one, None), mix.mean().expand(16, -1), rtol=0, atol=1e-12)
    a, s = torch.tensor(0.8), torch.tensor(0.6)
    torch.testing.assert_close(mix(x.float(), a, s, None), mix(x, 0.8, 0.6, None).float(), rtol=1e-4, atol=1e-4)


def test_mixture_moments_match_exact_draws():
    mix = gmm_2d()
    n = 200_000
    draws = mix.sample(n, torch.Generator().manual_seed(0))
    _assert_moments(draws, mix)


def test_reference_ode_matches_closed_form_single_gaussian():
    """One component: in VE coordinates y - mu scales as sqrt(s^2 + sigma^2) along the flow, for any grid kind."""
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.3
    mix = GaussianMixture([1.0], mu[None], [s])
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for alpha0, sigma0 in ((1.0, 80.0), (0.05, math.sqrt(1 - 0.05**2)), (0.0, 1.0)):
        out = mix.ode_reference(x, alpha0, sigma0)
        if alpha0 == 0:  # flow start: x is pure noise, the flow map is mu + s * x
            exact = mu + s * x
        else:
            exact = mu + (x / alpha0 - mu) * s / math.hypot(s, sigma0 / alpha0)
        torch.testing.assert_close(out, exact, rtol=0, atol=1e-10)


def test_reference_ode_lands_on_the_data():
    mix = gmm_2d()
    gen = torch.Generator().manual_seed(1)
    # a single start from near-pure noise lands where exact samples are typical (above their 0.1% quantile)
    start = 80.0 * torch.randn(1, 2, dtype=torch.float64, generator=gen)
    floor = torch.quantile(mix.log_prob(mix.sample(100_000, gen)), 1e-3)
    assert mix.log_prob(mix.ode_reference(start, 1.0, 80.0)) >= floor
    # the pushforward of exact noisy states (at sigma 80) is the data distribution
    starts = mix.sample_level(2000, 1.0, 80.0, generator=gen)
    _assert_moments(mix.ode_reference(starts, 1.0, 80.0, rtol=1e-8, atol=1e-8), mix)


# ------------------------------------------------------------------------------ deterministic: order


# Grid: EDM's ve_grid (Karras rho 7, sigma 80 -> 0.002 -> 0). Its levels are a smooth function of i/(n-1),
# so every step shrinks as 1/n (the premise of an order), and its first level and last nonzero level are the
# same for every n. vp_grid's discrete levels sit on rounded integer timesteps (a jagged grid, and with
# "leading" spacing the first level moves with n). The exponential-integrator samplers are invariant to
# alpha at fixed SNR, so a VP grid with the same SNRs would give the same numbers.
#
# The last step, sigma_min -> 0, is the same map in every sampler: x_N = D(x_{N-1}) (exact denoiser at
# sigma_min). The target is therefore D(exact ODE solution at sigma_min): the measured error is the
# integration error over [80, 0.002], not the fixed O(sigma_min^2) exit error of stopping at 0.002 (~1e-5,
# which would floor the high-order curves). The ODE part has n - 1 steps; slopes are fitted against n - 1.
#
# Steps: 512..2048. Below that the error is not yet asymptotic: Karras' last steps are ~25/(n-1) long in
# log-SNR, 1st-order runs still send a few 2-D trajectories to the wrong component up to n ~ 200, and
# UniPC-3's local slopes read 4.7 at n ~ 128-512 before settling at 4 (measured; see the report).
STEPS = (512, 1024, 2048)
BATCH = 16

# nominal orders. UniPC: UniP-p with the UniC corrector has order p + 1 (Zhao et al. 2023, Thm 3.3); the
# warm-up steps and the final lower-order predictor act where D barely moves (sigma 80, sigma ~ 0.002), so
# they do not show at these step counts.
# dpmpp_3m by default reproduces diffusers' DPMSolverMultistep(solver_order=3) (parity-tested), whose
# D2 = (D1_0 - D1_1) / (r0 + r1) estimates h^2 D''/2 where the phi_3 weight needs h^2 D'' (the singlestep
# solver's D2 has the factor 2): each step errs by O(h^3), so it converges at order 2, asserted as measured.
# third_order="taylor" doubles D2 and is asserted at its nominal order 3.
DETERMINISTIC = [
    ("euler", "euler", {}, 1),
    ("ddim", "ddim", {"eta": 0.0}, 1),
    ("heun", "heun", {}, 2),
    ("dpmpp_2m", "dpmpp_2m", {}, 2),
    ("dpmpp_2s", "dpmpp_2s", {}, 2),
    ("dpmpp_3m_diffusers", "dpmpp_3m", {}, 2),
    ("dpmpp_3m_taylor", "dpmpp_3m", {"third_order": "taylor"}, 3),
    ("unipc_bh1_2", "unipc", {"variant": "bh1", "order": 2}, 3),
    ("unipc_bh2_2", "unipc", {"variant": "bh2", "order": 2}, 3),
    ("unipc_bh1_3", "unipc", {"variant": "bh1", "order": 3}, 4),
    ("unipc_bh2_3", "unipc", {"variant": "bh2", "order": 3}, 4),
]


@pytest.fixture(scope="module", params=sorted(MIXTURES))
def ode_case(request):
    """A mixture, float64 starting states at sigma 80 and the target D(ODE solution at sigma_min)."""
    mix = MIXTURES[request.param]()
    grid = ve_grid(8)
    a0, s0, a_min, s_min = (float(grid.alphas[0]), float(grid.sigmas[0]), float(grid.alphas[-2]),
                            float(grid.sigmas[-2]))
    x = grid.init_scale * torch.randn(BATCH, mix.dim, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(0))
    target = mix(mix.ode_reference(x, a0, s0, a_min, s_min), a_min, s_min, None)
    return mix, x, target


def _rms(a, b) -> float:
    return (a - b).square().mean().sqrt().item()


@pytest.mark.parametrize("label, name, options, nominal", DETERMINISTIC)
def test_deterministic_order(ode_case, label, name, options, nominal):
    mix, x, target = ode_case
    errors = [_rms(sample(name, mix, x, ve_grid(n), **options), target) for n in STEPS]
    slope = -np.polyfit(np.log(np.array(STEPS) - 1.0), np.log(errors), 1)[0]
    assert errors[-1] < errors[0], (label, errors)
    assert abs(slope - nominal) <= 0.5, f"{label}: measured order {slope:.2f}, nominal {nominal}; errors {errors}"


# ------------------------------------------------------------------------------ stochastic: moments


def _assert_moments(samples: torch.Tensor, mix: GaussianMixture) -> None:
    """Mean and covariance within Z standard errors of the exact ones (SEs estimated from the samples)."""
    n = samples.shape[0]
    centred = samples - mix.mean()
    mean_err = centred.mean(0)
    mean_se = samples.std(0) / math.sqrt(n)
    products = centred[:, :, None] * centred[:, None, :]
    cov_err = products.mean(0) - mix.covariance()
    cov_se = products.std(0) / math.sqrt(n)
    assert (mean_err.abs() <= Z * mean_se).all(), f"mean off by {mean_err.tolist()}, SE {mean_se.tolist()}"
    assert (cov_err.abs() <= Z * cov_se).all(), f"covariance off by {cov_err.tolist()}, SE {cov_se.tolist()}"


_ANCESTRAL_REASON = (
    "weak order 1: at 50 Karras steps the discretisation bias of ancestral sampling with an exact "
    "denoiser (mean ~0.06, covariance ~0.17, measured with 100k samples; it halves with each doubling of "
    "steps) exceeds the 5-SE sampling tolerance of 20k samples (~0.06 / ~0.1); see test_ancestral_bias_vanishes"
)


def _posterior_draw(mix, generator):
    """An exact consistency function for LCM: a draw from p(x0 | x) (the posterior *mean* is not one)."""
    return lambda x, alpha, sigma, t: mix.posterior_sample(x, alpha, sigma, generator)


STOCHASTIC = [
    pytest.param("euler_ancestral", {}, marks=pytest.mark.xfail(strict=True, reason=_ANCESTRAL_REASON)),
    pytest.param("ddpm", {}, marks=pytest.mark.xfail(strict=True, reason=_ANCESTRAL_REASON)),
    pytest.param("ddim", {"eta": 1.0}, marks=pytest.mark.xfail(strict=True, reason=_ANCESTRAL_REASON)),
    ("dpmpp_2m_sde", {}),
    ("lcm", {}),
]


def _stochastic_run(name, options, steps, n=20_000, seed=1):
    mix = gmm_2d()
    grid = ve_grid(steps)
    gen = torch.Generator().manual_seed(seed)
    # start from the exact marginal at sigma 80, so the only errors are the sampler's and sampling noise
    x = mix.sample_level(n, float(grid.alphas[0]), float(grid.sigmas[0]), generator=gen)
    denoiser = _posterior_draw(mix, gen) if name == "lcm" else mix
    return mix, sample(name, denoiser, x, grid, generator=gen, **options)


@pytest.mark.parametrize("name, options", STOCHASTIC)
def test_stochastic_moments(name, options):
    mix, samples = _stochastic_run(name, options, 50)
    _assert_moments(samples, mix)


@pytest.mark.parametrize("name, options", [("euler_ancestral", {}), ("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_ancestral_bias_vanishes(name, options):
    """The same check at 400 steps, where the 1/n bias (~0.01) is below the sampling tolerance."""
    mix, samples = _stochastic_run(name, options, 400)
    _assert_moments(samples, mix)


# ----------------------------------------------------------------------------------------- host syncs


class _SyncCounter(TorchDispatchMode):
    """Counts aten._local_scalar_dense: every .item(), float(tensor), bool(tensor) or data-dependent branch."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_is_sync_free(name, dtype):
    mix = gmm_2d()
    grid = ve_grid(6)
    gen = torch.Generator().manual_seed(0)
    x = grid.init_scale * torch.randn(4, 2, generator=gen, dtype=dtype)
    with _SyncCounter() as counter:
        out = sample(name, mix, x, grid, generator=gen)
    assert counter.syncs == 0
    assert torch.isfinite(out).all()


def test_sync_counter_sees_item():
    with _SyncCounter() as counter:
        torch.ones(2).sum().item()
    assert counter.syncs == 1
