"""Sync-free samplers over a :class:`diffrt.core.schedules.Grid`.

``sample(name, denoiser, x, grid)`` integrates from ``x`` at the grid's first level to its last;
``prepare``/``run`` split that into host-side planning and the device loop (for CUDA graph capture).
Names load lazily: ``available()`` and ``get()`` (the registry) need no torch, so ``diffrt samplers`` starts
fast; ``sample``, ``prepare``, ``run`` and ``from_diffusers`` import torch on first use.
"""

__all__ = ["Plan", "available", "from_diffusers", "get", "prepare", "register", "run", "sample", "with_spacing"]


def __getattr__(name: str):
    if name in ("available", "get", "register"):
        from . import methods, registry  # noqa: F401  (methods registers the built-in samplers)

        return getattr(registry, name)
    if name in ("Plan", "prepare", "run", "sample"):
        from . import base

        return getattr(base, name)
    if name in ("from_diffusers", "with_spacing"):
        from . import diffusers_compat

        return getattr(diffusers_compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
