"""Parity with diffusers: the same toy model through a diffusers scheduler loop and through
``from_diffusers`` + ``sample`` gives the same result (float64 inputs; diffusers computes some steps in float32)."""

import diffusers
import pytest
import torch

from diffrt.core.denoisers import consistency_denoiser, prediction_denoiser
from diffrt.samplers import from_diffusers, sample

from .toy import toy_model

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = (1, 2, 4, 10, 25)
TOLERANCE = 1e-5


def _dpm(**kw):
    return diffusers.DPMSolverMultistepScheduler(**SD, **kw)


def _unipc(**kw):
    return diffusers.UniPCMultistepScheduler(**SD, **kw)


# (id, scheduler factory, extra step() kwargs shared by both sides)
CASES = [
    ("ddim-sd", lambda: diffusers.DDIMScheduler(**SD, set_alpha_to_one=False, clip_sample=False, steps_offset=1), {}),
    ("ddim-eta-trailing", lambda: diffusers.DDIMScheduler(**SD, clip_sample=False, timestep_spacing="trailing"),
     {"eta": 0.7}),
    ("ddim-v", lambda: diffusers.DDIMScheduler(**SD, clip_sample=False, prediction_type="v_prediction"), {}),
    ("ddpm", lambda: diffusers.DDPMScheduler(**SD, clip_sample=False), {}),
    ("euler", lambda: diffusers.EulerDiscreteScheduler(**SD), {}),
    ("euler-leading", lambda: diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1), {}),
    ("euler-karras", lambda: diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True), {}),
    ("euler-ancestral", lambda: diffusers.EulerAncestralDiscreteScheduler(**SD), {}),
    ("heun", lambda: diffusers.HeunDiscreteScheduler(**SD), {}),
    ("dpm-1", lambda: _dpm(solver_order=1), {}),
    ("dpm-2m", lambda: _dpm(), {}),
    ("dpm-2m-karras", lambda: _dpm(use_karras_sigmas=True), {}),
    ("dpm-2m-heun", lambda: _dpm(solver_type="heun"), {}),
    ("dpm-2m-sigma-min", lambda: _dpm(final_sigmas_type="sigma_min"), {}),
    ("dpm-2m-v", lambda: _dpm(prediction_type="v_prediction", use_karras_sigmas=True), {}),
    ("dpm-3m", lambda: _dpm(solver_order=3), {}),
    ("dpm-2m-sde", lambda: _dpm(algorithm_type="sde-dpmsolver++"), {}),
    ("dpm-2s", lambda: diffusers.DPMSolverSinglestepScheduler(**SD), {}),
    ("unipc-bh2", lambda: _unipc(), {}),
    ("unipc-bh2-order3", lambda: _unipc(solver_order=3), {}),
    ("unipc-bh2-order1", lambda: _unipc(solver_order=1), {}),
    # diffusers' bh1 produces NaN when the last sigma is 0 (B(h) = -h is infinite there, multiplied by 0),
    # so bh1 is compared with final_sigmas_type="sigma_min"; diffrt's bh1 stays finite in both cases.
    ("unipc-bh1", lambda: _unipc(solver_type="bh1", final_sigmas_type="sigma_min"), {}),
    ("unipc-bh1-order3", lambda: _unipc(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"), {}),
    ("lcm", lambda: diffusers.LCMScheduler(**SD), {}),
    # SD 1.x's own scheduler (its scheduler_config.json), and v-prediction (diffusers combines raw v outputs)
    ("pndm-sd15", lambda: diffusers.PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
     {}),
    ("pndm-v-alpha-one", lambda: diffusers.PNDMScheduler(**SD, skip_prk_steps=True, prediction_type="v_prediction",
                                                          set_alpha_to_one=True), {}),
    ("pndm-trailing", lambda: diffusers.PNDMScheduler(**SD, skip_prk_steps=True, timestep_spacing="trailing"), {}),
    ("flow-euler", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), {}),
]


def _prediction(scheduler) -> str:
    if isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        return "flow"
    return scheduler.config.prediction_type


def run_diffusers(scheduler, n, noise, seed, step_kwargs):
    scheduler.set_timesteps(n)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    generator = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in scheduler.step.__code__.co_varnames
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching has none
    for t in scheduler.timesteps:
        out = toy_model(scale_input(x, t), t)
        extra = {"generator": generator} if takes_generator else {}
        x = scheduler.step(out, t, x, **extra, **step_kwargs).prev_sample
    return x


def run_diffrt(scheduler, n, noise, seed, step_kwargs):
    name, grid, options = from_diffusers(scheduler, n)
    if isinstance(scheduler, diffusers.LCMScheduler):
        denoiser = consistency_denoiser(toy_model, timestep_scaling=scheduler.config.timestep_scaling)
    else:
        denoiser = prediction_denoiser(toy_model, _prediction(scheduler))
    generator = torch.Generator().manual_seed(seed)
    return sample(name, denoiser, noise * grid.init_scale, grid, generator=generator, **options, **step_kwargs)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(case, n):
    _, make, step_kwargs = case
    noise = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    reference = run_diffusers(make(), n, noise, 7, step_kwargs)
    ours = run_diffrt(make(), n, noise, 7, step_kwargs)
    assert torch.isfinite(reference).all()
    error = ((ours - reference).abs().max() / reference.abs().max()).item()
    assert error <= TOLERANCE, f"relative error {error:.2e}"


def test_unipc_bh1_finite_at_zero_final_sigma():
    noise = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = run_diffrt(_unipc(solver_type="bh1"), 6, noise, 0, {})
    assert torch.isfinite(out).all()


def test_from_diffusers_leaves_scheduler_untouched():
    scheduler = _dpm()
    from_diffusers(scheduler, 7)
    assert scheduler.num_inference_steps is None


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda: diffusers.DDIMScheduler(**SD, clip_sample=True), "clip_sample"),
        (lambda: _dpm(thresholding=True), "thresholding"),
        (lambda: _dpm(algorithm_type="dpmsolver"), "algorithm_type"),
        (lambda: _dpm(algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order"),
        (lambda: diffusers.DPMSolverSinglestepScheduler(**SD, solver_order=3), "solver_order"),
        (lambda: _unipc(predict_x0=False), "predict_x0"),
        (lambda: diffusers.DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_large"), "variance_type"),
        (lambda: diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "stochastic_sampling"),
        (lambda: diffusers.DDIMScheduler(**SD, clip_sample=False, timestep_spacing="trailing"), "timestep_spacing"),
        # PNDM steps to t - 1000 // n, which linspace's timesteps are not: diffusers then calls the model at
        # another level than the one it stepped to
        (lambda: diffusers.PNDMScheduler(**SD, skip_prk_steps=True, timestep_spacing="linspace"), "timestep_spacing"),
        (lambda: diffusers.PNDMScheduler(**SD), "skip_prk_steps"),  # the Runge-Kutta start is not built
        (lambda: diffusers.PNDMScheduler(**SD, skip_prk_steps=True, prediction_type="sample"), "prediction_type"),
    ],
)
def test_unsupported_configuration_names_the_option(make, option):
    n = 3  # trailing DDIM at 3 steps has unequal steps (999, 666, 332)
    with pytest.raises(ValueError, match=option):
        from_diffusers(make(), n)


def test_unsupported_scheduler_lists_supported():
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        from_diffusers(diffusers.DEISMultistepScheduler(), 4)
