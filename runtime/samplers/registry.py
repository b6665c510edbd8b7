"""The sampler registry: names, summaries and options of the samplers, importable without torch.

A sampler is a planning function (host math on float64 numpy arrays) and a loop (:mod:`diffrt.samplers.base`
runs it). :mod:`diffrt.samplers.methods` registers the built-in ones; ``diffrt samplers`` lists them from
here without importing torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampler:
    name: str
    plan: Callable[..., tuple[dict[str, Any], dict[str, Any]]]  # (host grid, **options) -> coefs, static facts
    loop: Callable[..., Any]  # (denoiser, x, plan, generator) -> x
    stochastic: bool
    summary: str

    @property
    def suits_flow(self) -> bool:
        """Deterministic solvers of the probability-flow ODE work on any grid, flow-matching ones included;
        the stochastic ones here are written for VP/consistency models."""
        return not self.stochastic

    def options(self) -> list[str]:
        params = inspect.signature(self.plan).parameters
        return [p for p in params if p != "host"] + (["noise_dtype"] if self.stochastic else [])


_REGISTRY: dict[str, Sampler] = {}


def register(name: str, plan, loop, *, stochastic: bool = False, summary: str = "") -> None:
    _REGISTRY[name] = Sampler(name, plan, loop, stochastic, summary)


def available() -> list[str]:
    """Names of all samplers, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Sampler:
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
