"""Map a configured diffusers scheduler to the diffrt sampler, grid and options that reproduce it.

The grid is read from the scheduler's own ``set_timesteps`` (on a copy), so every timestep spacing and sigma
option diffusers offers is honoured exactly; the sampler and options carry the update rule.
"""

from __future__ import annotations

import inspect

import torch

from ..core.schedules import Grid


def _reject(scheduler, option: str, value, allowed: str) -> None:
    raise ValueError(
        f"{type(scheduler).__name__} with {option}={value!r} is not supported by from_diffusers; supported: {allowed}"
    )


def _require(scheduler, option: str, allowed: tuple) -> None:
    value = scheduler.config.get(option, allowed[0])
    if value not in allowed:
        _reject(scheduler, option, value, " or ".join(repr(a) for a in allowed))


def _fresh(scheduler, n: int, mu=None, sigmas=None):
    """A copy of ``scheduler`` with its timesteps set for ``n`` steps; ``mu`` (the resolution shift) goes to
    schedulers with dynamic shifting, ``sigmas`` (custom sigmas before the shift) to those that take them."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}")
    copy = type(scheduler).from_config(scheduler.config)
    accepts = inspect.signature(copy.set_timesteps).parameters
    options = {}
    if copy.config.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError(f"{type(scheduler).__name__} with use_dynamic_shifting=True needs mu= (the resolution "
                             "shift; diffrt's pipeline computes it from the image's token count)")  # fmt: skip
        options["mu"] = float(mu)
    if sigmas is not None and "sigmas" in accepts:
        options["sigmas"] = [float(s) for s in sigmas]
    copy.set_timesteps(n, **options)
    return copy


def _flow_grid(sched, timesteps: torch.Tensor) -> Grid:
    """Grid of a scheduler whose sigmas are flow times (alpha = 1 - sigma): flow matching, ``use_flow_sigmas``."""
    sigmas = sched.sigmas.to(torch.float64)
    t = torch.cat([timesteps.to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    return Grid(alphas=1 - sigmas, sigmas=sigmas, timesteps=t, init_scale=1.0, kind="flow")


def _solver_grid(sched) -> Grid:
    """The DPM-Solver / UniPC grid: VP levels from k-diffusion sigmas, or flow levels with ``use_flow_sigmas``."""
    if sched.config.get("use_flow_sigmas"):
        _require(sched, "prediction_type", ("flow_prediction",))
        _require(sched, "final_sigmas_type", ("zero",))
        return _flow_grid(sched, sched.timesteps)
    return _sigma_grid(sched, sched.sigmas, sched.timesteps, scaled_state=False)


def _vp_from_ve(ve_sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alphas = 1 / (1 + ve_sigmas**2).sqrt()
    return alphas, ve_sigmas * alphas


def _sigma_grid(sched, ve_sigmas: torch.Tensor, timesteps: torch.Tensor, scaled_state: bool) -> Grid:
    """Grid of a scheduler that lists k-diffusion sigmas (sigma/alpha) per step.

    Euler-family schedulers keep their state divided by alpha (``scaled_state``): their initial noise scale
    converts to ours by a factor alpha_0. The DPM-Solver and UniPC schedulers keep the VP state itself.
    """
    alphas, sigmas = _vp_from_ve(ve_sigmas.to(torch.float64))
    t = torch.cat([timesteps.to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    init = float(sched.init_noise_sigma) * (float(alphas[0]) if scaled_state else 1.0)
    return Grid(alphas=alphas, sigmas=sigmas, timesteps=t, init_scale=init, kind="vp")


def _acp_grid(sched, timesteps: torch.Tensor, final_acp: float) -> Grid:
    """Grid of a scheduler that indexes alphas_cumprod at integer timesteps (DDIM, DDPM)."""
    acp = sched.alphas_cumprod.to(torch.float64)
    levels = torch.cat([acp[timesteps.long()], torch.tensor([final_acp], dtype=torch.float64)])
    t = torch.cat([timesteps.to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    return Grid(alphas=levels.sqrt(), sigmas=(1 - levels).sqrt(), timesteps=t, init_scale=1.0, kind="vp")


def _check_consecutive(sched, prev_of, option="timestep_spacing", timesteps=None) -> None:
    """DDIM/DDPM/PNDM step from t to their own notion of the previous timestep; it must be the next listed one."""
    ts = [int(t) for t in (sched.timesteps if timesteps is None else timesteps)]
    for t, nxt in zip(ts, ts[1:] + [-1], strict=True):
        if prev_of(t) != nxt and not (prev_of(t) < 0 and nxt == -1):
            _reject(sched, option, sched.config.get(option), "a spacing whose steps are all equal for this n")


def _common_vp_checks(sched) -> None:
    _require(sched, "thresholding", (False,))
    if "clip_sample" in sched.config:
        _require(sched, "clip_sample", (False,))


def _ddim(sched):
    _common_vp_checks(sched)
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    _check_consecutive(sched, lambda t: t - ratio)
    final = 1.0 if sched.config.set_alpha_to_one else float(sched.alphas_cumprod[0])
    return "ddim", _acp_grid(sched, sched.timesteps, final), {}


def _ddpm(sched):
    _common_vp_checks(sched)
    _require(sched, "variance_type", ("fixed_small",))
    _check_consecutive(sched, lambda t: int(sched.previous_timestep(t)))
    return "ddpm", _acp_grid(sched, sched.timesteps, 1.0), {}


def _euler(sched):
    if sched.config.get("interpolation_type", "linear") != "linear":
        _reject(sched, "interpolation_type", sched.config.interpolation_type, "'linear'")
    grid = _sigma_grid(sched, sched.sigmas, sched.timesteps, scaled_state=True)
    return "euler", grid, {}


def _euler_ancestral(sched):
    grid = _sigma_grid(sched, sched.sigmas, sched.timesteps, scaled_state=True)
    return "euler_ancestral", grid, {}


def _heun(sched):
    # diffusers interleaves each intermediate level twice: [s0, s1, s1, s2, s2, ..., 0]
    sigmas = torch.cat([sched.sigmas[0:-1:2], sched.sigmas[-1:]])
    grid = _sigma_grid(sched, sigmas, sched.timesteps[0::2], scaled_state=True)
    return "heun", grid, {}


def _dpm_multistep(sched):
    _common_vp_checks(sched)
    _require(sched, "algorithm_type", ("dpmsolver++", "sde-dpmsolver++"))
    _require(sched, "variance_type", (None,))
    _require(sched, "solver_order", (2, 1, 3))
    sde = sched.config.algorithm_type == "sde-dpmsolver++"
    order = sched.config.solver_order
    grid = _solver_grid(sched)
    steps = {"lower_order_final": sched.config.lower_order_final, "euler_at_final": sched.config.euler_at_final}
    if order == 1:  # first-order DPM-Solver++ is DDIM; its SDE form is the DDPM posterior step
        return ("ddpm", grid, {"noise_dtype": torch.float32}) if sde else ("euler", grid, {})
    if sde:
        if order == 3:
            _reject(sched, "solver_order", 3, "1 or 2 with algorithm_type='sde-dpmsolver++'")
        return "dpmpp_2m_sde", grid, {"solver_type": sched.config.solver_type, "noise_dtype": torch.float32, **steps}
    name = "dpmpp_2m" if order == 2 else "dpmpp_3m"
    return name, grid, {"solver_type": sched.config.solver_type, **steps}


def _dpm_singlestep(sched):
    _common_vp_checks(sched)
    _require(sched, "algorithm_type", ("dpmsolver++",))
    _require(sched, "solver_order", (2, 1))
    grid = _solver_grid(sched)
    if sched.config.solver_order == 1:
        return "euler", grid, {}
    options = {"solver_type": sched.config.solver_type, "lower_order_final": sched.config.lower_order_final}
    return "dpmpp_2s", grid, options


def _unipc(sched):
    _common_vp_checks(sched)
    _require(sched, "predict_x0", (True,))
    _require(sched, "solver_p", (None,))
    _require(sched, "solver_type", ("bh2", "bh1"))
    _require(sched, "solver_order", (2, 1, 3))
    grid = _solver_grid(sched)
    options = {
        "variant": sched.config.solver_type,
        "order": sched.config.solver_order,
        "lower_order_final": sched.config.lower_order_final,
        "disable_corrector": tuple(sched.config.disable_corrector),
    }
    return "unipc", grid, options


def _pndm_config(sched) -> None:
    # checked before set_timesteps, which fails on its own for some step counts with the Runge-Kutta start
    if not sched.config.skip_prk_steps:
        _reject(sched, "skip_prk_steps", False, "True (the PLMS start of SD 1.x; the Runge-Kutta start is not built)")
    _require(sched, "prediction_type", ("epsilon", "v_prediction"))


def _pndm(sched):
    levels = torch.unique_consecutive(sched.timesteps)  # its list repeats the second level (the Heun start's call)
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    _check_consecutive(sched, lambda t: t - ratio, timesteps=levels)
    final = 1.0 if sched.config.set_alpha_to_one else float(sched.alphas_cumprod[0])
    combine = "v" if sched.config.prediction_type == "v_prediction" else "eps"
    return "pndm", _acp_grid(sched, levels, final), {"combine": combine}


def _lcm(sched):
    _common_vp_checks(sched)
    # LCM returns the boundary-scaled x0 estimate at the last step, so the grid always ends clean.
    return "lcm", _acp_grid(sched, sched.timesteps, 1.0), {}


def _flow_euler(sched):
    # shift, dynamic shifting (exponential or linear), shift_terminal and karras/exponential/beta sigmas are
    # all in the sigmas set_timesteps computed; what changes the update rule itself is refused
    _require(sched, "stochastic_sampling", (False,))
    _require(sched, "invert_sigmas", (False,))
    return "euler", _flow_grid(sched, sched.timesteps), {}


_MAPPERS = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "HeunDiscreteScheduler": _heun,
    "DPMSolverMultistepScheduler": _dpm_multistep,
    "DPMSolverSinglestepScheduler": _dpm_singlestep,
    "UniPCMultistepScheduler": _unipc,
    "LCMScheduler": _lcm,
    "PNDMScheduler": _pndm,
    "FlowMatchEulerDiscreteScheduler": _flow_euler,
}

_CONFIG_CHECKS = {"PNDMScheduler": _pndm_config}  # what must hold before the scheduler's own set_timesteps


def from_diffusers(scheduler, n: int, *, mu: float | None = None, sigmas=None) -> tuple[str, Grid, dict]:
    """Return ``(sampler_name, grid, options)`` that reproduce ``scheduler`` run for ``n`` steps.

    ``mu``: the resolution shift of schedulers with ``use_dynamic_shifting`` (FLUX.1, SD3.5: what their
    pipelines compute from the image's token count); ``sigmas``: custom sigmas before the shift, for the
    schedulers that take them (FluxPipeline passes ``linspace(1, 1/n, n)``).

    The scheduler is not modified. The model's prediction type (``scheduler.config.prediction_type``) is the
    denoiser's concern (see :mod:`diffrt.core.denoisers`); for an LCM scheduler wrap the model with
    ``consistency_denoiser(..., timestep_scaling=scheduler.config.timestep_scaling)``. When the scheduler's
    configuration ends short of the clean sample (DDIM ``set_alpha_to_one=False``, ``final_sigmas_type=
    "sigma_min"``), so does the grid.
    """
    table = getattr(scheduler, "tabulated", None)  # a deployed export's stand-in: what this gave at export
    found = table(n) if table is not None and mu is None and sigmas is None else None
    if found is not None:
        return found
    scheduler = as_diffusers(scheduler)
    kind = type(scheduler).__name__
    if kind not in _MAPPERS:
        raise ValueError(f"from_diffusers does not support {kind}; supported: {', '.join(sorted(_MAPPERS))}")
    _CONFIG_CHECKS.get(kind, lambda s: None)(scheduler)
    return _MAPPERS[kind](_fresh(scheduler, n, mu, sigmas))


def as_diffusers(scheduler):
    """``scheduler`` itself, or for a stand-in that records only a class name and config (a deployed export's
    :class:`~diffrt.models.deployment.SavedScheduler`) that diffusers scheduler rebuilt from its config."""
    if hasattr(scheduler, "set_timesteps"):
        return scheduler
    import diffusers

    kind = getattr(scheduler, "class_name", type(scheduler).__name__)
    if not isinstance(getattr(diffusers, kind, None), type):
        raise ValueError(f"{kind!r} is not a diffusers scheduler")
    return getattr(diffusers, kind).from_config(dict(scheduler.config))


def with_spacing(scheduler, spacing: str):
    """A copy of ``scheduler`` whose timesteps are placed by ``spacing`` ("leading", "trailing", "linspace")."""
    scheduler = as_diffusers(scheduler)
    if "timestep_spacing" not in scheduler.config:
        raise ValueError(f"spacing={spacing!r} does not apply to {type(scheduler).__name__}: it has no "
                         "timestep_spacing (name a sampler to sample on diffrt's spacings)")  # fmt: skip
    return type(scheduler).from_config(scheduler.config, timestep_spacing=spacing)
