"""diffrt: an inference runtime and benchmark suite for diffusion models."""

__version__ = "0.1.0"


def load(source, *, device=None, dtype=None, backend: str = "torch", vae_precision: str = "auto", **backend_options):
    """Load a local diffusers folder or a preset name (``sd15``, ``sd21``, ``sdxl``, ``tiny``) as a Pipeline.

    ``device``: "cpu", "cuda" (default: cuda when available); ``dtype``: torch.float32/float16/bfloat16
    (default: float16 on CUDA, float32 on CPU); ``backend``: see ``diffrt.backends.names()``.
    """
    from .pipeline import load_pipeline

    return load_pipeline(source, device=device, dtype=dtype, backend=backend, vae_precision=vae_precision,
                         **backend_options)  # fmt: skip
