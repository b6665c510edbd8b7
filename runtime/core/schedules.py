"""Noise schedules and sampling grids.

Every model family is written in one form: a noisy state is ``x = alpha * x0 + sigma * noise``.
VP models (DDPM, Stable Diffusion) have ``alpha**2 + sigma**2 == 1``; VE/EDM models have ``alpha == 1``;
rectified-flow models have ``alpha = 1 - t, sigma = t``. A :class:`Grid` lists the levels a sampler visits,
all in float64 on the CPU, computed once before the sampling loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")
SIGMA_KINDS = ("discrete", "karras", "exponential")
GRID_KINDS = ("vp", "ve", "flow")


@dataclass(frozen=True)
class VPSchedule:
    """A discrete variance-preserving training schedule: ``alphas_cumprod[t]`` for t in [0, T)."""

    alphas_cumprod: torch.Tensor  # float64, shape [T], decreasing

    def __post_init__(self):
        acp = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).flatten()
        if acp.numel() < 2:
            raise ValueError(f"a VP schedule needs at least 2 timesteps, got {acp.numel()}")
        if not torch.isfinite(acp).all() or (acp <= 0).any() or (acp > 1).any():
            raise ValueError("alphas_cumprod must be finite and in (0, 1]")
        if (acp[1:] > acp[:-1]).any():
            raise ValueError("alphas_cumprod must not increase with t")
        object.__setattr__(self, "alphas_cumprod", acp)

    @property
    def T(self) -> int:
        return self.alphas_cumprod.numel()

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> VPSchedule:
        return cls(torch.cumprod(1.0 - betas.to(torch.float64), dim=0))

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> VPSchedule:
        return cls.from_betas(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> VPSchedule:
        """Stable Diffusion's schedule: betas linear in sqrt space."""
        return cls.from_betas(torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> VPSchedule:
        """Nichol & Dhariwal's cosine schedule (diffusers' ``squaredcos_cap_v2``)."""

        def alpha_bar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
        return cls.from_betas(torch.tensor(betas, dtype=torch.float64))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VP alpha and sigma at integer timesteps ``t``."""
        acp = self.alphas_cumprod[t.long()]
        return acp.sqrt(), (1 - acp).sqrt()

    def ve_sigmas(self) -> torch.Tensor:
        """Noise-to-signal ratio sigma/alpha at every training timestep (k-diffusion's sigma)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def timestep_for(self, ve_sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep of a noise-to-signal ratio (linear interpolation in log sigma)."""
        log_sigmas = self.ve_sigmas().log()
        log_s = ve_sigma.to(torch.float64).clamp(min=1e-30).log()
        # log_sigmas increases with t; find the bracketing pair and interpolate.
        hi = torch.searchsorted(log_sigmas, log_s).clamp(1, self.T - 1)
        lo = hi - 1
        w = ((log_s - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0, 1)
        return lo.to(torch.float64) + w


@dataclass(frozen=True)
class Grid:
    """The levels of an n-step run: n+1 entries each; the last is normally the clean end (alpha 1, sigma 0).

    ``timesteps[i]`` is what the model is told at level i (the last entry is never used for a model call).
    ``init_scale`` turns unit Gaussian noise into the starting state: ``x = noise * init_scale``.
    ``kind`` ("vp", "ve" or "flow") picks the coordinates of samplers whose result depends on them (heun).
    """

    alphas: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_scale: float = 1.0
    kind: str = "vp"

    def __post_init__(self):
        for name in ("alphas", "sigmas", "timesteps"):
            object.__setattr__(self, name, torch.as_tensor(getattr(self, name), dtype=torch.float64).flatten())
        validate_grid(self)

    @property
    def steps(self) -> int:
        return self.alphas.numel() - 1

    @property
    def log_snr(self) -> torch.Tensor:
        """lambda = log(alpha / sigma); -inf where alpha is 0, +inf where sigma is 0."""
        return self.alphas.log() - self.sigmas.log()


def validate_grid(grid: Grid) -> None:
    """Raise ValueError unless the grid is well formed. Works on host copies (numpy): no tensor syncs."""
    alphas, sigmas, timesteps = (getattr(grid, k).detach().cpu().numpy() for k in ("alphas", "sigmas", "timesteps"))
    n = alphas.size
    if sigmas.size != n or timesteps.size != n:
        raise ValueError(f"grid lengths differ: alphas {n}, sigmas {sigmas.size}, timesteps {timesteps.size}")
    if n < 2:
        raise ValueError(f"a grid needs at least 2 levels (1 step), got {n}")
    for name, v in (("alphas", alphas), ("sigmas", sigmas), ("timesteps", timesteps)):
        if not np.isfinite(v).all():
            raise ValueError(f"grid {name} contain non-finite values: {v.tolist()}")
    if (alphas < 0).any() or (sigmas < 0).any():
        raise ValueError("grid alphas and sigmas must be >= 0")
    if ((alphas == 0) & (sigmas == 0)).any():
        raise ValueError("a grid level cannot have both alpha and sigma equal to 0")
    if (sigmas[:-1] == 0).any():
        raise ValueError("only the last grid level may have sigma 0 (the clean end)")
    with np.errstate(divide="ignore"):
        lam = np.log(alphas) - np.log(sigmas)
    if not (lam[1:] > lam[:-1]).all():
        with np.errstate(divide="ignore"):
            ratio = (sigmas / alphas).tolist()
        raise ValueError(f"grid noise must strictly decrease, but sigma/alpha = {ratio}")
    if not math.isfinite(grid.init_scale) or grid.init_scale <= 0:
        raise ValueError(f"grid init_scale must be a positive finite number, got {grid.init_scale}")
    if grid.kind not in GRID_KINDS:
        raise ValueError(f"grid kind must be one of {GRID_KINDS}, got {grid.kind!r}")


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}")


def vp_timesteps(T: int, n: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """Integer model timesteps of an n-step run, highest first, as diffusers spaces them.

    "leading" follows DDIMScheduler (SD's original spacing: multiples of T // n, plus ``steps_offset``);
    "trailing" and "linspace" follow DPMSolverMultistepScheduler and UniPCMultistepScheduler.
    """
    _check_steps(n)
    if n > T:
        raise ValueError(f"cannot take {n} steps on a schedule of {T} timesteps")
    if spacing == "leading":
        ratio = T // n
        t = torch.arange(n, dtype=torch.float64).mul(ratio).round().flip(0) + steps_offset
    elif spacing == "trailing":
        t = (torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1)[:n]
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return t.clamp(0, T - 1)


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def vp_grid(
    schedule: VPSchedule,
    n: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    sigmas: str = "discrete",
    rho: float = 7.0,
) -> Grid:
    """An n-step grid for a VP model, ending at the clean end.

    ``sigmas="discrete"`` uses the schedule's levels at the spaced timesteps; ``"karras"``/``"exponential"``
    space the noise-to-signal ratio between the schedule's extremes (as diffusers' ``use_karras_sigmas``) and
    tell the model the nearest timestep. The state starts as unit noise (``init_scale`` 1), as in diffusers.
    """
    if sigmas not in SIGMA_KINDS:
        raise ValueError(f"sigmas must be one of {SIGMA_KINDS}, got {sigmas!r}")
    t = vp_timesteps(schedule.T, n, spacing, steps_offset)
    if sigmas == "discrete":
        alpha, sigma = schedule.alpha_sigma(t)
    else:
        ve = schedule.ve_sigmas()
        lo, hi = ve[0].item(), ve[-1].item()
        if sigmas == "karras":
            s = _karras(lo, hi, n, rho)
        else:
            s = torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp()
        t = schedule.timestep_for(s)
        if sigmas == "karras":  # diffusers rounds karras timesteps but not exponential ones
            t = t.round()
        alpha = 1 / (1 + s**2).sqrt()
        sigma = s * alpha
    return Grid(
        alphas=torch.cat([alpha, torch.ones(1, dtype=torch.float64)]),
        sigmas=torch.cat([sigma, torch.zeros(1, dtype=torch.float64)]),
        timesteps=torch.cat([t, torch.zeros(1, dtype=torch.float64)]),
        init_scale=1.0,
        kind="vp",
    )


def ve_grid(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Grid:
    """Karras et al.'s (EDM) n-step grid for a VE model (alpha 1); the model is told sigma itself."""
    _check_steps(n)
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    s = torch.cat([_karras(sigma_min, sigma_max, n, rho), torch.zeros(1, dtype=torch.float64)])
    return Grid(alphas=torch.ones_like(s), sigmas=s, timesteps=s.clone(), init_scale=sigma_max, kind="ve")


def shift_flow_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift of flow-matching models (SD3, Flux): ``s*t / (1 + (s-1)*t)``."""
    return shift * t / (1 + (shift - 1) * t)


def flow_grid(n: int, shift: float = 1.0, timestep_scale: float = 1000.0) -> Grid:
    """An n-step rectified-flow grid: alpha = 1 - t, sigma = t, from exactly t = 1 (pure noise) to t = 0.

    The model is told ``t * timestep_scale`` (diffusers' flow-matching convention).
    """
    _check_steps(n)
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be a positive finite number, got {shift}")
    t = shift_flow_sigmas(torch.linspace(1, 0, n + 1, dtype=torch.float64), shift)
    return Grid(alphas=1 - t, sigmas=t, timesteps=t * timestep_scale, init_scale=1.0, kind="flow")
