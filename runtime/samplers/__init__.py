"""Sync-free samplers over a :class:`diffrt.schedules.Grid`.

``sample(name, denoiser, x, grid)`` integrates from ``x`` at the grid's first level to its last;
``prepare``/``run`` split that into host-side planning and the device loop (for CUDA graph capture).
"""

from . import methods  # noqa: F401  (registers the built-in samplers)
from .base import Plan, available, get, prepare, run, sample
from .diffusers_compat import from_diffusers

__all__ = ["Plan", "available", "from_diffusers", "get", "prepare", "run", "sample"]
