"""The two phases every sampler has: planning on the host, the loop on the device.

``prepare`` does all host-side math (float64 numpy) and uploads per-step coefficients to the sample's device
once; ``run`` is the loop, which only indexes those tensors and calls the denoiser: no ``.item()``, no
``.cpu()``, no branching on tensor values, so the whole loop can be captured as one CUDA graph.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.schedules import Grid, validate_grid
from . import methods  # noqa: F401  (registers the built-in samplers)
from .registry import get


@dataclass(frozen=True)
class Levels:
    """The grid on the sample's device, in the compute dtype."""

    alphas: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def steps(self) -> int:
        return self.alphas.numel() - 1


@dataclass(frozen=True)
class Plan:
    """Everything a sampler loop needs: levels and coefficient tensors on the device, static host-side facts."""

    name: str
    levels: Levels
    coefs: dict[str, torch.Tensor]  # name -> [steps, ...] tensor on the device
    static: dict[str, Any] = field(default_factory=dict)  # python lists: orders, which steps add noise, ...
    noise_dtype: torch.dtype | None = None
    host_key: str = ""  # digest of every host-side value baked into the loop (see plan_key); no device reads

    def denoise(self, denoiser, x: torch.Tensor, i: int) -> torch.Tensor:
        """One model evaluation at level i, returned in x's dtype."""
        levels = self.levels
        return denoiser(x, levels.alphas[i], levels.sigmas[i], levels.timesteps[i]).to(x.dtype)

    def noise_like(self, x: torch.Tensor, generator) -> torch.Tensor:
        """Standard normal noise shaped like x. ``generator`` may be a list with one generator per batch item,
        so that item k's randomness does not depend on the rest of the batch."""
        dtype = self.noise_dtype or x.dtype
        if isinstance(generator, list | tuple):  # each drawn where its generator lives (CPU ones, as diffusers)
            parts = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
            return torch.stack(parts).to(x.device, x.dtype)
        device = x.device if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=dtype).to(x.device, x.dtype)


@dataclass(frozen=True)
class HostGrid:
    """The grid as float64 numpy arrays, with log-SNR, for the planning phase."""

    alphas: np.ndarray
    sigmas: np.ndarray
    timesteps: np.ndarray
    log_snr: np.ndarray
    kind: str

    @property
    def steps(self) -> int:
        return self.alphas.size - 1

    @classmethod
    def of(cls, grid: Grid) -> HostGrid:
        a, s, t = (
            getattr(grid, k).detach().cpu().numpy().astype(np.float64) for k in ("alphas", "sigmas", "timesteps")
        )
        with np.errstate(divide="ignore"):
            lam = np.log(a) - np.log(s)
        return cls(a, s, t, lam, grid.kind)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Steps run in float32, or float64 when the sample is float64, whatever the model's dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def prepare(name: str, grid: Grid, device, dtype: torch.dtype, **options) -> Plan:
    """Validate and plan a run of sampler ``name`` on ``grid``: host math once, coefficients uploaded once."""
    sampler = get(name)
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a diffrt.core.schedules.Grid, got {type(grid).__name__}")
    validate_grid(grid)
    allowed = sampler.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"option(s) {unknown} do not apply to sampler {name!r}; its options: {allowed or 'none'}"
        )
    noise_dtype = options.pop("noise_dtype", None)
    if noise_dtype is not None and noise_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"noise_dtype must be torch.float32 or torch.float64, got {noise_dtype}")
    host = HostGrid.of(grid)
    coefs, static = sampler.plan(host, **options)
    for key, value in coefs.items():
        if not np.isfinite(value).all():
            raise ValueError(
                f"sampler {name!r} is undefined on this grid (non-finite {key!r} coefficients); "
                "a grid that starts at alpha 0 (flow grids) needs a sampler that supports it (euler, dpmpp_2m, ...)"
            )
    levels = Levels(*(getattr(grid, k).to(device=device, dtype=dtype) for k in ("alphas", "sigmas", "timesteps")))
    tensors = {k: torch.as_tensor(v, dtype=dtype).to(device) for k, v in coefs.items()}
    return Plan(name, levels, tensors, static, noise_dtype, plan_key(name, host, coefs, static, noise_dtype, dtype))


def plan_key(name: str, host: HostGrid, coefs: dict, static: dict, noise_dtype, dtype) -> str:
    """A digest of what a captured loop bakes in: the sampler, the grid's levels, every coefficient's values
    (which is where options like ``solver_type`` end up), the static facts and the dtypes. Two plans with the
    same key run the same kernels on the same numbers; it is computed from the host copies only."""
    digest = hashlib.sha256(repr((name, host.kind, sorted(static.items()), str(noise_dtype), str(dtype))).encode())
    for array in (host.alphas, host.sigmas, host.timesteps, *(coefs[k] for k in sorted(coefs))):
        array = np.ascontiguousarray(array, dtype=np.float64)
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def run(plan: Plan, denoiser, x: torch.Tensor, generator=None) -> torch.Tensor:
    """Integrate from x at the plan's first level to its last level; x must be in the plan's dtype.

    ``generator``: a torch.Generator on x's device, a list of them (one per batch item), or None.
    """
    if isinstance(generator, list | tuple) and len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; give one per item")
    return get(plan.name).loop(denoiser, x, plan, generator)


def sample(name: str, denoiser, x: torch.Tensor, grid: Grid, *, generator=None, **options) -> torch.Tensor:
    """Integrate from the state ``x`` at the grid's first level to its last level (the clean end).

    ``x`` is the starting state (``noise * grid.init_scale`` for a fresh sample). Steps compute in float32
    (float64 for a float64 ``x``); the result has x's dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
    dtype = compute_dtype(x)
    plan = prepare(name, grid, x.device, dtype, **options)
    return run(plan, denoiser, x.to(dtype), generator).to(x.dtype)

