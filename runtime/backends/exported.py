"""What the exported-graph backends (onnxruntime, tensorrt) share: graph folders from an
:class:`~diffrt.artifacts.ArtifactSource` per precision, one runner per graph opened from them, input checks
against the specs, and the float32 VAE fallback.

The VAE encoder (image-to-image only) opens on first use; everything else opens at load, so a broken or
missing artifact is reported by ``diffrt.load``, not by the first call.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import families
from ..families.base import VAE_GRAPHS


class ExportedBackend:
    """Subclasses set ``name`` and implement ``open_runner(folder, manifest, graph)``: an object whose
    ``run(inputs) -> outputs`` runs one graph."""

    name = "exported"

    def __init__(self, components, device: torch.device, dtype: torch.dtype, artifacts, precision: str):
        self.components, self.device, self.dtype = components, device, dtype
        self.artifacts, self.precision = artifacts, precision
        self.specs = families.of(components).graph_specs(components)
        self.vae_precision = precision
        self.loop_capture = None
        self._folders: dict[str, tuple[Path, dict]] = {}
        self._runners: dict[str, object] = {}
        self._folder(precision, list(self.specs))  # export/build or verify now, so errors come at load time

    def open_all(self) -> None:
        for graph in self.specs:
            if graph != "vae_encoder":
                self.runner(graph)

    def _folder(self, precision: str, graphs: list[str]) -> tuple[Path, dict]:
        self._folders[precision] = self.artifacts.folder(precision, graphs)
        return self._folders[precision]

    def graph_precision(self, graph: str) -> str:
        return self.vae_precision if graph in VAE_GRAPHS else self.precision

    def runner(self, graph: str):
        """The runner of ``graph``, opened on first use from its precision's folder."""
        if graph not in self._runners:
            precision = self.graph_precision(graph)
            if precision not in self._folders or graph not in self._folders[precision][1]["graphs"]:
                self._folder(precision, [graph])
            folder, manifest = self._folders[precision]
            self._runners[graph] = self.open_runner(folder, manifest, graph)
        return self._runners[graph]

    def open_runner(self, folder: Path, manifest: dict, graph: str):
        raise NotImplementedError

    def folder(self, precision: str) -> tuple[Path, dict]:
        """The (folder, manifest) the graphs of ``precision`` come from."""
        return self._folders[precision]

    def run(self, graph: str, **inputs) -> dict[str, torch.Tensor]:
        if graph not in self.specs:
            raise ValueError(f"unknown graph {graph!r}; this model has {list(self.specs)}")
        return self.runner(graph).run(inputs)

    def upcast_vae(self) -> None:
        """Run the VAE from float32 artifacts from now on (fp16 VAEs overflow on some latents)."""
        if self.vae_precision == "fp32":
            return
        self._folder("fp32", list(VAE_GRAPHS))
        self.vae_precision = "fp32"
        for graph in VAE_GRAPHS:
            self._runners.pop(graph, None)
