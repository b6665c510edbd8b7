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
    # valid on flow-matching grids (which start at alpha 0): the deterministic solvers of the probability-flow
    # ODE, but for those written in VP terms (PNDM's DDIM transfer divides by alpha); not the stochastic ones
    suits_flow: bool = True

    def options(self) -> list[str]:
        params = inspect.signature(self.plan).parameters
        return [p for p in params if p != "host"] + (["noise_dtype"] if self.stochastic else [])


_REGISTRY: dict[str, Sampler] = {}


def register(name: str, plan, loop, *, stochastic: bool = False, summary: str = "", flow: bool | None = None) -> None:
    """``flow``: whether it runs on flow-matching grids (default: when it draws no noise)."""
    _REGISTRY[name] = Sampler(name, plan, loop, stochastic, summary, not stochastic if flow is None else flow)


def available() -> list[str]:
    """Names of all samplers, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Sampler:
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
