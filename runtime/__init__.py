"""diffrt: an inference runtime and benchmark suite for diffusion models."""

from .core.startup import fast_start
from .core.version import __version__

__all__ = ["Pipeline", "__version__", "fast_start", "load"]


def load(source, *, device=None, dtype=None, backend: str = "torch", vae_precision: str = "auto", **backend_options):
    """Load an embedded model (``fashion``, ...), a preset (``sd15``, ``sd21``, ``sdxl``, ``tiny``) or a local
    diffusers folder as a Pipeline; see :func:`diffrt.api.load`."""
    from .api import load as load_pipeline

    return load_pipeline(source, device=device, dtype=dtype, backend=backend, vae_precision=vae_precision,
                         **backend_options)  # fmt: skip


def __getattr__(name: str):
    if name == "Pipeline":  # imported on first use: ``import diffrt`` does not import torch
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
