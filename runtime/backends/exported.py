"""What the exported-graph backends (onnxruntime, tensorrt) share: graph folders from an
an artifact source per precision (an object whose ``folder(precision, graphs)`` returns a verified
``(path, manifest)``: the export cache's, or a deployed folder's), one runner per graph opened from them, input
checks against the specs, and the float32 VAE fallback.

The VAE encoder (image-to-image only) opens on first use; everything else opens at load, so a broken or
missing artifact is reported by ``diffrt.load``, not by the first call.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import deployment, families, lora
from ..models.families.base import VAE_GRAPHS
from .base import Backend


class ExportedBackend(Backend):
    """Subclasses set ``name`` and implement ``open_runner(folder, manifest, graph)``: an object whose
    ``run(inputs) -> outputs`` runs one graph."""

    name = "exported"
    writes_weights = True  # into the graphs' initializers (onnxruntime overrides them, tensorrt refits)

    def __init__(self, components, device: torch.device, dtype: torch.dtype, artifacts, precision: str):
        self.components, self.device, self.dtype = components, device, dtype
        self.artifacts, self.precision = artifacts, precision
        self.specs = families.model(components).graph_specs()
        self.vae_precision = precision
        self._folders: dict[str, tuple[Path, dict]] = {}
        self._runners: dict[str, object] = {}
        self._initializers: dict[str, InitializerIndex] = {}
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

    # ------------------------------------------------------------------------------------ LoRA weights
    def write_weights(self, part: str, weights: dict[str, torch.Tensor]) -> None:
        """Put ``{layer path: weight}`` of ``part`` into its exported graph without re-exporting: each layer's
        ONNX initializer is found by its content (the torch module keeps the base weights) and replaced by the
        subclass's ``replace_initializers(graph, {name: array}, restored)`` (restored: names back at base)."""
        graph = part
        if graph not in self.specs:
            raise ValueError(f"this model has no graph {graph!r} to write LoRA weights into; it has {list(self.specs)}")
        index = self._initializer_index(graph)
        arrays, restored = {}, set()
        for module, weight in weights.items():
            base = lora.layer(self.components, part, module)[1].weight.detach()
            name, transposed = index.locate(base, f"{part}.{module}")
            array = weight.detach().to("cpu", torch.float32).numpy().astype(index.dtypes[name])
            arrays[name] = array.T.copy() if transposed else array
            if torch.equal(weight.to(base.device, base.dtype), base):
                restored.add(name)
        self.replace_initializers(graph, arrays, restored)

    def _initializer_index(self, graph: str) -> InitializerIndex:
        if graph not in self._initializers:
            self._initializers[graph] = InitializerIndex(self.onnx_file(graph))
        return self._initializers[graph]

    def onnx_file(self, graph: str) -> Path:
        """The ONNX file whose initializers ``graph``'s runner was made from."""
        raise NotImplementedError

    def replace_initializers(self, graph: str, arrays: dict, restored: set) -> None:
        raise NotImplementedError


class InitializerIndex:
    """The initializers of one ONNX file by content: exporters rename weights and store some linear layers
    transposed (MatMul), so a torch weight is found by the digest of its bytes, as is or transposed.
    ``conv_weights`` names the initializers that convolutions consume."""

    CONVOLUTIONS = ("Conv", "ConvTranspose")

    def __init__(self, path: Path):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path), load_external_data=True)
        self.path = path
        self.dtypes: dict[str, object] = {}
        self._names: dict[tuple, list[str]] = {}
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            self.dtypes[tensor.name] = array.dtype
            self._names.setdefault(_content_key(array), []).append(tensor.name)
        self.conv_weights = {name for node in model.graph.node if node.op_type in self.CONVOLUTIONS
                             for name in node.input if name in self.dtypes}  # fmt: skip

    def locate(self, weight: torch.Tensor, what: str) -> tuple[str, bool]:
        """(initializer name, stored transposed) of the torch ``weight`` (of layer ``what``)."""
        import numpy as np

        values = weight.detach().to("cpu", torch.float32).numpy()
        for dtype in dict.fromkeys(d for d in self.dtypes.values() if np.issubdtype(d, np.floating)):
            candidates = [(values.astype(dtype), False)]
            if values.ndim == 2:
                candidates.append((np.ascontiguousarray(values.T.astype(dtype)), True))
            for array, transposed in candidates:
                names = self._names.get(_content_key(array), [])
                if len(names) > 1:
                    raise ValueError(f"{self.path.name}: initializers {names} all equal {what}'s weight; cannot "
                                     "tell which one to replace")  # fmt: skip
                if names:
                    return names[0], transposed
        raise ValueError(f"{self.path.name} has no initializer equal to {what}'s weight (folded or fused at export?): "
                         "that weight cannot be replaced without re-exporting")  # fmt: skip


def _content_key(array) -> tuple:
    import hashlib

    return array.dtype.str, array.shape, hashlib.sha1(array.tobytes()).digest()


def artifact_source(components, options: dict):
    """A deployed folder's own graphs (verified at load), or None: the backend then exports through the cache.
    The options that say where graphs come from belong to the folder then, so none may be given (``cache_dir``
    is not one of those: a deployed folder needs no cache, so it is left unused)."""
    if not components.deployed:
        return None
    given = sorted(set(options) - {"cache_dir"})
    if given:
        raise ValueError(f"{components.path} is a deployed export: its graphs are its own, so {', '.join(given)} "
                         "cannot be given")  # fmt: skip
    return deployment.FolderSource(components.path, components.deployed)
