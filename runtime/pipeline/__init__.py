"""Layer 4, the pipeline: a request checked once, then encode, prepare, denoise and decode over a backend.

``diffrt.load`` returns a :class:`Pipeline`; ``from diffrt.pipeline import Pipeline`` keeps working."""

from .pipe import VAE_PRECISIONS, Cancelled, Pipeline

__all__ = ["VAE_PRECISIONS", "Cancelled", "Pipeline"]
