"""Backends run a model's graphs behind one interface (:class:`diffrt.backends.base.Backend`).

One module per backend: ``torch`` (eager), ``compile`` (torch.compile), ``triton`` (fused kernels, whole-loop
CUDA graphs), ``onnxruntime`` and ``tensorrt`` (exported graphs). Each module says whether it can run here
(``is_available()``), which options it takes (``OPTIONS``) and builds its backend with
``create(components, device, dtype, **options)``, importing what it needs itself: the exporter
(:mod:`diffrt.export`) for the exported-graph backends, the kernels (:mod:`diffrt.kernels`) for triton.
:func:`create` checks a name and its options once, then builds.
"""

from __future__ import annotations

from . import compile_backend, onnxruntime_backend, tensorrt_backend, torch_backend, triton_backend
from .base import check_options

MODULES = {
    "torch": torch_backend,
    "triton": triton_backend,
    "compile": compile_backend,
    "onnxruntime": onnxruntime_backend,
    "tensorrt": tensorrt_backend,
}
# A deployed export holds graphs of one kind and no torch modules: only that kind's backend runs it.
DEPLOYED = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}


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


def check(name: str, options: dict):
    """The backend's module, once it is known to run here and to take ``options`` (cheap: no model needed)."""
    backend = module(name)
    ok, reason = backend.is_available()
    if not ok:
        raise ValueError(f"backend {name!r} cannot run here: {reason}")
    check_options(name, options, backend.OPTIONS)
    return backend


def check_deployed(components, name: str) -> None:
    """A deployed export (no torch modules) runs only on the backend of its graphs' kind."""
    kind = components.deployed["kind"]
    if DEPLOYED[kind] != name:
        raise ValueError(f"{components.path} is a deployed {kind} export (no torch modules): it runs on backend "
                         f"{DEPLOYED[kind]!r}, not {name!r}")  # fmt: skip


def create(name: str, components, device, dtype, checked=None, **options):
    """Backend ``name`` for loaded ``components``; ``checked``: the module :func:`check` already returned for
    these options (``diffrt.load`` checks before loading the model, and not again)."""
    backend = checked or check(name, options)
    if components.deployed:
        check_deployed(components, name)
    return backend.create(components, device, dtype, **options)
