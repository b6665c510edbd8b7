"""The torch.compile backend: the U-Net and VAE-decoder graph modules compiled by TorchInductor.

Compilation happens on the first call of each graph and again for each new input shape (``dynamic=False``
keeps the fastest static kernels; a benchmark's cold start shows the cost). ``mode`` is torch.compile's:
"default", "reduce-overhead" (CUDA graphs inside Inductor) or "max-autotune".
"""

from __future__ import annotations

import torch

from .base import check_options
from .torch_backend import TorchBackend

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILED_GRAPHS = ("unet", "vae_decoder")
OPTIONS = ("mode", "dynamic")


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
        self.compiled = {name: self._compile(name) for name in COMPILED_GRAPHS}

    def _compile(self, graph: str):
        return torch.compile(self.modules[graph], mode=self.mode, dynamic=self.dynamic)

    def graph_module(self, graph: str):
        return self.compiled[graph] if graph in self.compiled else self.modules[graph]

    def upcast_vae(self) -> None:
        super().upcast_vae()
        self.compiled["vae_decoder"] = self._compile("vae_decoder")  # recompile for float32


def create(components, device, dtype, **options) -> CompileBackend:
    check_options("compile", options, OPTIONS)
    return CompileBackend(components, device, dtype, **options)
