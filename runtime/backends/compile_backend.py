"""The torch.compile backend: the U-Net and VAE-decoder graph modules compiled by TorchInductor.

Compilation happens on the first call of each graph and again for each new input shape (``dynamic=False``
keeps the fastest static kernels; a benchmark's cold start shows the cost). ``mode`` is torch.compile's:
"default", "reduce-overhead" (CUDA graphs inside Inductor) or "max-autotune".
"""

from __future__ import annotations

import logging

import torch

from .base import check_options
from .torch_backend import TorchBackend

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIONS = ("mode", "dynamic")

log = logging.getLogger(__name__)


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
        # the denoiser (the family's: unet or transformer) and the VAE decoder
        self.compiled = {name: self._compile(name) for name in (self.family.denoiser_part, "vae_decoder")}
        self._compiled_for: set[tuple] = set()  # (graph, dtype, first input's shape) already compiled
        self._pieces: dict[tuple[str, str], object] = {}  # step caches' passes, compiled on first use

    def _compile(self, graph: str):
        return torch.compile(self.modules[graph], mode=self.mode, dynamic=self.dynamic)

    def graph_module(self, graph: str):
        return self.compiled[graph] if graph in self.compiled else self.modules[graph]

    def run(self, graph: str, **inputs) -> dict[str, torch.Tensor]:
        if graph in self.compiled:
            self._announce(graph, inputs)
        return super().run(graph, **inputs)

    def cache_piece(self, graph: str, piece: str):
        if (graph, piece) not in self._pieces:
            log.info("compiling the step cache's %s pass of %s with torch.compile (mode %s)", piece, graph, self.mode)
            function = super().cache_piece(graph, piece)
            self._pieces[graph, piece] = torch.compile(function, mode=self.mode, dynamic=self.dynamic)
        return self._pieces[graph, piece]

    def _announce(self, graph: str, inputs: dict) -> None:
        """Say so when a call will compile: the first call of each graph and size takes minutes, silently.
        Keyed on the first input's shape (the batch and latent size the others follow): one lookup per call."""
        first = next(iter(inputs.values()))
        key = (graph, self.vae_dtype if graph == "vae_decoder" else self.dtype, tuple(first.shape))
        if key not in self._compiled_for:
            self._compiled_for.add(key)
            log.info("compiling %s with torch.compile (mode %s, first call at %s; this can take minutes)",
                     graph, self.mode, "x".join(map(str, first.shape)))  # fmt: skip

    def upcast_vae(self) -> None:
        super().upcast_vae()
        self.compiled["vae_decoder"] = self._compile("vae_decoder")  # recompile for float32


def create(components, device, dtype, **options) -> CompileBackend:
    check_options("compile", options, OPTIONS)
    return CompileBackend(components, device, dtype, **options)
