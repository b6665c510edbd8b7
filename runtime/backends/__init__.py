"""Backends run a pipeline's graphs behind one small interface (:class:`diffrt.backends.base.Backend`).

One module per backend: ``torch`` (eager), ``compile`` (torch.compile), ``triton`` (fused kernels, whole-loop
CUDA graphs), ``onnxruntime`` and ``tensorrt`` (exported graphs). Each module says whether it can run here
(``is_available()``) and builds its backend with ``create(components, device, dtype, **options)``. Backends
that need something from the layers above the runtime (exported artifacts, the kernel patcher) take it as an
argument; ``diffrt.load`` (:mod:`diffrt.api`) supplies it.
"""

from __future__ import annotations

from . import compile_backend, onnxruntime_backend, tensorrt_backend, torch_backend, triton_backend

MODULES = {
    "torch": torch_backend,
    "triton": triton_backend,
    "compile": compile_backend,
    "onnxruntime": onnxruntime_backend,
    "tensorrt": tensorrt_backend,
}


def names() -> list[str]:
    return list(MODULES)


def module(name: str):
    if name not in MODULES:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(MODULES)}")
    return MODULES[name]


def availability() -> dict[str, str | None]:
    """Backend name -> None when it can run here, else the reason it cannot."""
    result = {}
    for name, backend in MODULES.items():
        ok, reason = backend.is_available()
        result[name] = None if ok else reason
    return result


def create(name: str, components, device, dtype, **options):
    """Backend ``name`` from exactly what is given: the onnxruntime and tensorrt backends then need
    ``artifacts=`` and triton ``patcher=``; :func:`diffrt.api.create_backend` (what ``diffrt.load`` uses)
    supplies those from the export and kernel layers."""
    backend = module(name)
    ok, reason = backend.is_available()
    if not ok:
        raise ValueError(f"backend {name!r} cannot run here: {reason}")
    return backend.create(components, device, dtype, **options)
