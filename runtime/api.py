"""``diffrt.load``: a model source and a backend put together into a :class:`~diffrt.pipeline.Pipeline`.

The one loading path: the backend and its options are checked once (before any weights are read), the source
is read once into components and a dtype, and the backend builds what it needs itself (:mod:`diffrt.backends`).
"""

from __future__ import annotations

from . import backends
from .core.devices import resolve_device_dtype
from .models import control
from .models.loading import load_components, resolve
from .pipeline.pipe import VAE_PRECISIONS, Pipeline


def load(source, *, device=None, dtype=None, backend: str = "torch", vae_precision: str = "auto", loras=None,
         controlnet=None, **backend_options) -> Pipeline:  # fmt: skip
    """Load an embedded model or a preset (by name) or a local diffusers folder as a Pipeline.

    ``device``: "cpu", "cuda" (default: cuda when available); ``dtype``: torch.float32/float16/bfloat16 or
    their names (default: float16 on CUDA, float32 on CPU); ``backend``: one of ``diffrt.backends.names()``;
    ``loras``: ``{path: scale}`` or ``[(path, scale), ...]`` merged at load (``Pipeline.load_lora``);
    ``controlnet``: a diffusers ControlNet folder, an embedded one (``fashion-controlnet``) or a list of them
    (calls then take ``control_image=``; see :mod:`diffrt.models.control`);
    ``backend_options``: that backend's (e.g. ``providers=`` for onnxruntime, ``mode=`` for compile).
    """
    source = resolve(source)  # a deployed export runs at its own precision unless told otherwise
    device, dtype = resolve_device_dtype(device, source.dtype if dtype is None else dtype)
    checked = backends.check(backend, backend_options)  # before any heavy loading
    if vae_precision not in VAE_PRECISIONS:
        raise ValueError(f"vae_precision must be one of {VAE_PRECISIONS}, got {vae_precision!r}")
    components = load_components(source, dtype=dtype, device=device)
    if controlnet is not None:
        components.controlnets = control.load(controlnet, components, dtype)
    runner = backends.create(backend, components, device, dtype, checked=checked, **backend_options)
    pipe = Pipeline(components, runner, device, dtype, vae_precision=vae_precision)
    for path, scale in (loras.items() if isinstance(loras, dict) else loras or ()):
        pipe.load_lora(path, scale=scale)
    return pipe
