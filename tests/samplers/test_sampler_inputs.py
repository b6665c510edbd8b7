"""The sampler API: registry, options, dtypes, and a clear ValueError for every bad input."""

import pytest
import torch

from diffrt.core.schedules import Grid, VPSchedule, flow_grid, vp_grid
from diffrt.samplers import available, prepare, run, sample

REQUIRED = {"euler", "euler_ancestral", "heun", "ddim", "ddpm", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde",
            "dpmpp_2s", "unipc", "lcm"}


def shrink(x, alpha, sigma, t):
    return 0.5 * x


GRID = vp_grid(VPSchedule.scaled_linear(), 6)


def test_registry_has_every_required_sampler():
    assert REQUIRED <= set(available())


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_keeps_input_dtype_and_is_finite(name, dtype):
    x = torch.randn(2, 3, 5, 5).to(dtype)
    out = sample(name, shrink, x, GRID, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_steps_compute_in_float32_for_low_precision_models(name):
    seen = []

    def recording(x, alpha, sigma, t):
        seen.append((x.dtype, alpha.dtype))
        return (0.5 * x).half()  # a half-precision model output

    sample(name, recording, torch.randn(1, 2, 3, 3).half(), GRID, generator=torch.Generator().manual_seed(0))
    assert set(seen) == {(torch.float32, torch.float32)}


def test_prepare_then_run_equals_sample():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    plan = prepare("dpmpp_3m", GRID, x.device, torch.float64)
    torch.testing.assert_close(run(plan, shrink, x), sample("dpmpp_3m", shrink, x, GRID))


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "dpmpp_3m", "euler_ancestral", "lcm", "dpmpp_2s", "heun"])
def test_flow_grids_starting_at_alpha_zero_work(name):
    out = sample(name, shrink, torch.randn(2, 3, 3, 3), flow_grid(5), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()


def test_unknown_sampler_lists_available():
    with pytest.raises(ValueError, match="available: .*dpmpp_2m"):
        sample("dpm_fast", shrink, torch.randn(1, 1), GRID)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("euler", {"eta": 0.5}, r"\['eta'\] do not apply to sampler 'euler'"),
        ("dpmpp_2m", {"order": 3}, "do not apply"),
        ("heun", {"noise_dtype": torch.float32}, "do not apply"),
        ("ddim", {"eta": 2.0}, "eta must be"),
        ("unipc", {"variant": "bh3"}, "variant must be one of"),
        ("unipc", {"order": 4}, "order must be one of"),
        ("dpmpp_2m", {"solver_type": "rk4"}, "solver_type"),
        ("ddpm", {"noise_dtype": torch.float16}, "noise_dtype"),
        ("dpmpp_2s", {"lower_order_final": False}, "even number of steps"),
    ],
)
def test_options_are_checked(name, options, match):
    grid = vp_grid(VPSchedule.scaled_linear(), 5)
    with pytest.raises(ValueError, match=match):
        sample(name, shrink, torch.randn(1, 2), grid, **options)


def test_grid_must_be_a_grid():
    with pytest.raises(ValueError, match="Grid"):
        sample("euler", shrink, torch.randn(1, 2), {"alphas": [1.0]})


def test_state_must_be_a_float_tensor():
    with pytest.raises(ValueError, match="floating-point"):
        sample("euler", shrink, torch.ones(1, 2, dtype=torch.int64), GRID)


def test_grid_corrupted_after_construction_is_caught():
    grid = vp_grid(VPSchedule.scaled_linear(), 4)
    grid.sigmas[1] = float("inf")  # tensors are mutable; sample re-validates
    with pytest.raises(ValueError, match="non-finite"):
        sample("euler", shrink, torch.randn(1, 2), grid)


def test_sampler_undefined_on_grid_says_so():
    # UniPC's bh1 corrector divides by B(h) = -h, infinite on a step from alpha 0
    with pytest.raises(ValueError, match="undefined on this grid"):
        sample("unipc", shrink, torch.randn(1, 2), flow_grid(4), variant="bh1")


def test_non_clean_grid_ends_where_it_says():
    grid = Grid([0.6, 0.8], [0.8, 0.6], [900, 100])
    out = sample("euler", lambda x, a, s, t: torch.zeros_like(x), torch.ones(1, 2), grid)
    # with D = 0 the DDIM step scales the state by sigma_next / sigma
    torch.testing.assert_close(out, torch.full((1, 2), 0.75))
