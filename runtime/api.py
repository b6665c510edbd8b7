"""``diffrt.load``: a model source and a backend put together into a :class:`~diffrt.pipeline.Pipeline`.

This is the one place that knows every layer: it gives the backends what they need from above the runtime
(exported artifacts from :mod:`diffrt.export` for onnxruntime and tensorrt, the kernel patcher from
:mod:`diffrt.kernels` for triton), so the runtime itself imports neither.
"""

from __future__ import annotations

from . import backends, control, deployment
from .backends.base import check_options
from .devices import resolve_device_dtype
from .loading import is_named, load_components
from .pipeline import VAE_PRECISIONS, Pipeline


def load(source, *, device=None, dtype=None, backend: str = "torch", vae_precision: str = "auto", loras=None,
         controlnet=None, **backend_options) -> Pipeline:  # fmt: skip
    """Load an embedded model or a preset (by name) or a local diffusers folder as a Pipeline.

    ``device``: "cpu", "cuda" (default: cuda when available); ``dtype``: torch.float32/float16/bfloat16 or
    their names (default: float16 on CUDA, float32 on CPU); ``backend``: one of ``diffrt.backends.names()``;
    ``loras``: ``{path: scale}`` or ``[(path, scale), ...]`` merged at load (``Pipeline.load_lora``);
    ``controlnet``: a diffusers ControlNet folder, an embedded one (``fashion-controlnet``) or a list of them
    (calls then take ``control_image=``; see :mod:`diffrt.control`);
    ``backend_options``: that backend's (e.g. ``providers=`` for onnxruntime, ``mode=`` for compile).
    """
    if dtype is None and not is_named(source) and deployment.is_deployment(source):
        dtype = deployment.precision_dtype(source)  # a deployed export runs at its own precision
    device, dtype = resolve_device_dtype(device, dtype)
    check_backend(backend, backend_options)  # before any heavy loading
    if vae_precision not in VAE_PRECISIONS:
        raise ValueError(f"vae_precision must be one of {VAE_PRECISIONS}, got {vae_precision!r}")
    components = load_components(source, dtype=dtype, device=device)
    if controlnet is not None:
        components.controlnets = control.load(controlnet, components, dtype)
    if components.deployed:
        _check_deployed_backend(source, components.deployed["kind"], backend, backend_options)
    runner = create_backend(backend, components, device, dtype, **backend_options)
    pipe = Pipeline(components, runner, device, dtype, vae_precision=vae_precision)
    for path, scale in (loras.items() if isinstance(loras, dict) else loras or ()):
        pipe.load_lora(path, scale=scale)
    return pipe


def create_backend(name: str, components, device, dtype, **options):
    """Backend ``name`` for loaded ``components``, with what it needs from the export and kernel layers."""
    module = check_backend(name, options)
    artifact_options = {k: v for k, v in options.items() if k in getattr(module, "ARTIFACT_OPTIONS", ())}
    options = {k: v for k, v in options.items() if k in module.OPTIONS}
    if components.deployed:  # its own folder, verified at load: nothing to export, diffusers never imported
        options["artifacts"] = deployment.FolderSource(components.path, components.deployed)
    elif name == "onnxruntime":
        from .export.sources import OnnxSource

        options["artifacts"] = OnnxSource(components, **artifact_options)
    elif name == "tensorrt":
        from .export.sources import EngineSource

        if device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on a CUDA GPU: load with device='cuda', not {str(device)!r}")
        options["artifacts"] = EngineSource(components, device, **artifact_options)
    elif name == "triton":
        from .kernels import patch

        options["patcher"] = patch
    return backends.create(name, components, device, dtype, **options)


def check_backend(name: str, options: dict):
    """The backend's module, once it is known to run here and to take ``options``."""
    module = backends.module(name)
    ok, reason = module.is_available()
    if not ok:
        raise ValueError(f"backend {name!r} cannot run here: {reason}")
    check_options(name, options, _allowed_options(module))
    return module


def _allowed_options(module) -> tuple[str, ...]:
    """A backend's own options and, for the exported-graph backends, those of its artifact source."""
    return (*module.OPTIONS, *getattr(module, "ARTIFACT_OPTIONS", ()))


_DEPLOYED_BACKENDS = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}


def _check_deployed_backend(source, kind: str, backend: str, options: dict) -> None:
    """A deployed folder holds graphs of one kind and no torch modules: only that kind's backend runs it, and
    the options that say where artifacts come from are the folder's own."""
    expected = _DEPLOYED_BACKENDS[kind]
    if backend != expected:
        raise ValueError(f"{source} is a deployed {kind} export (no torch modules): it runs on backend "
                         f"{expected!r}, not {backend!r}")  # fmt: skip
    given = sorted(set(options) & set(getattr(backends.module(backend), "ARTIFACT_OPTIONS", ())) - {"cache_dir"})
    if given:
        raise ValueError(f"{source} is a deployed export: its graphs are its own, so {', '.join(given)} cannot be "
                         "given")  # fmt: skip
