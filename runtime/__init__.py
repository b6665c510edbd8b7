"""diffrt: an inference runtime and benchmark suite for diffusion models."""

__version__ = "0.1.0"
