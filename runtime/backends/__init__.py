"""Backends run a pipeline's graphs (text encoders, U-Net, VAE) behind one small interface.

A backend is created from :class:`diffrt.loading.Components` and exposes ``run(graph, **inputs) -> dict``
for the graphs ``text_encoder``, ``text_encoder_2`` (SDXL), ``unet``, ``vae_encoder`` and ``vae_decoder``;
tensors in and out are named (see :mod:`diffrt.backends.torch_backend` for the names). Each backend module
says whether it can run here; asking for one that cannot is a clear error.
"""

from __future__ import annotations

import importlib

# name -> module under diffrt.backends; each module has is_available() -> (bool, reason) and create(...)
_MODULES = {
    "torch": "torch_backend",
    "triton": "triton_backend",
    "compile": "compile_backend",
    "onnxruntime": "onnxruntime_backend",
    "tensorrt": "tensorrt_backend",
}


def names() -> list[str]:
    return list(_MODULES)


def _module(name: str):
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(_MODULES)}")
    return importlib.import_module(f".{_MODULES[name]}", __name__)


def availability() -> dict[str, str | None]:
    """Backend name -> None when it can run here, else the reason it cannot."""
    result = {}
    for name in _MODULES:
        ok, reason = _module(name).is_available()
        result[name] = None if ok else reason
    return result


def create(name: str, components, device, dtype, **options):
    module = _module(name)
    ok, reason = module.is_available()
    if not ok:
        raise ValueError(f"backend {name!r} cannot run here: {reason}")
    return module.create(components, device, dtype, **options)
