"""Artifact sources for the exported-graph backends: the export cache, which exports or builds on first use, in
front of an optional folder made beforehand. An artifact source's ``folder(precision, graphs)`` returns a
verified ``(path, manifest)``; the onnxruntime and tensorrt backends build theirs from their options.
"""

from __future__ import annotations

from pathlib import Path

from ..models import artifacts
from .onnx_export import ensure_onnx
from .specs import ShapeRanges
from .trt_build import ensure_engines, onnx_precision_for


def given_folder(folder: Path | None, kind: str, graphs: list[str], precision: str, model_hash: str):
    """``(folder, manifest)`` when a folder made beforehand holds ``graphs`` at ``precision``; None when there
    is none, or when only the float32 VAE is asked of a folder of another precision (the cache makes that one).
    Anything else of another precision is refused: the folder was given to be used."""
    if folder is None:
        return None
    manifest = artifacts.open_folder(folder, kind, graphs, model_hash)
    if manifest["precision"] == precision:
        return folder, manifest
    if set(graphs) - {"vae_encoder", "vae_decoder"} or precision != "fp32":
        raise ValueError(f"{folder} holds {manifest['precision']} {kind} graphs but precision {precision!r} "
                         f"was asked for")  # fmt: skip
    return None


class OnnxSource:
    """ONNX graphs: from ``onnx_dir`` (verified against this model) for its own precision, else from the
    export cache (also the float32 VAE of an fp16 ``onnx_dir``)."""

    def __init__(self, components, *, cache_dir=None, onnx_dir=None, opset=None, exporter=None):
        self.components, self.cache_dir = components, artifacts.resolve_cache_dir(cache_dir)
        self.onnx_dir = None if onnx_dir is None else Path(onnx_dir)
        self.opset, self.exporter = opset, exporter
        self.model_hash = artifacts.model_hash(components)

    def folder(self, precision: str, graphs: list[str]) -> tuple[Path, dict]:
        given = given_folder(self.onnx_dir, "onnx", graphs, precision, self.model_hash)
        if given is not None:
            return given
        return ensure_onnx(self.components, precision=precision, opset=self.opset, exporter=self.exporter,
                           graphs=graphs, cache_dir=self.cache_dir, model_hash=self.model_hash)  # fmt: skip


class EngineSource:
    """TensorRT engines: from ``engine_dir`` for its own precision, else from the engine cache (built from
    the ONNX cache on first use). ``refit``: build refittable engines."""

    def __init__(self, components, device, *, cache_dir=None, engine_dir=None, ranges=None, refit=False,
                 workspace_bytes=None):  # fmt: skip
        if isinstance(ranges, dict):
            ranges = ShapeRanges(**{k: tuple(v) for k, v in ranges.items()})
        if ranges is not None and not isinstance(ranges, ShapeRanges):
            raise ValueError(f"ranges must be a ShapeRanges or a dict of (min, opt, max) triples, got {ranges!r}")
        self.components, self.device, self.ranges = components, device, ranges
        self.cache_dir = artifacts.resolve_cache_dir(cache_dir)
        self.engine_dir = None if engine_dir is None else Path(engine_dir)
        self.refit, self.workspace_bytes = bool(refit), workspace_bytes
        self.model_hash = artifacts.model_hash(components)

    def folder(self, precision: str, graphs: list[str]) -> tuple[Path, dict]:
        given = given_folder(self.engine_dir, "tensorrt", graphs, precision, self.model_hash)
        if given is not None:
            return given
        return ensure_engines(self.components, precision=precision, ranges=self.ranges, graphs=graphs,
                              cache_dir=self.cache_dir, refit=self.refit, workspace_bytes=self.workspace_bytes,
                              model_hash=self.model_hash, device=self.device)  # fmt: skip

    def refit_onnx(self, components, graph: str, precision: str) -> Path:
        """The ONNX file of ``graph`` with the weights of ``components``, for refitting an engine."""
        folder, manifest = ensure_onnx(components, precision=onnx_precision_for(precision), graphs=[graph],
                                       cache_dir=self.cache_dir)  # fmt: skip
        return folder / manifest["graphs"][graph]["onnx"]["file"]
