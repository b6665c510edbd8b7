"""The torch.compile backend: the eager modules compiled by TorchInductor (U-Net and VAE decoder).

Compilation happens on the first call of each graph and again for each new input shape (``dynamic=False``
keeps the fastest static kernels; a benchmark's cold start shows the cost). ``mode`` is torch.compile's:
"default", "reduce-overhead" (CUDA graphs inside Inductor) or "max-autotune".
"""

from __future__ import annotations

import torch

from .torch_backend import TorchBackend

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def is_available() -> tuple[bool, str]:
    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0)"
    return True, ""


class CompileBackend(TorchBackend):
    name = "compile"

    def __init__(self, components, device, dtype, mode: str = "default", dynamic: bool = False):
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
        super().__init__(components, device, dtype)
        self.mode, self.dynamic = mode, dynamic
        self._compiled_unet = self._compile(components.unet)
        self._compiled_decode = self._compile(self._eager_decode)

    def _compile(self, fn):
        return torch.compile(fn, mode=self.mode, dynamic=self.dynamic)

    def _eager_decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.components.vae.decode(latent).sample

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._compiled_decode(latent)

    def _unet_module(self):
        return self._compiled_unet

    def upcast_vae(self) -> None:
        super().upcast_vae()
        self._compiled_decode = self._compile(self._eager_decode)  # recompile for float32


def create(components, device, dtype, **options) -> CompileBackend:
    unknown = set(options) - {"mode", "dynamic"}
    if unknown:
        raise ValueError(f"option(s) {sorted(unknown)} do not apply to the compile backend; allowed: mode, dynamic")
    return CompileBackend(components, device, dtype, **options)
