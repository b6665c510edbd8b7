"""Export a pipeline's graphs to ONNX (and, where TensorRT exists, to engines), with a verified cache.

``export_onnx(pipe, out_dir)`` writes one ONNX file per graph and ``manifest.json``; ``build_engines``
builds TensorRT engines from them; the ``onnxruntime`` and ``tensorrt`` backends export and build through
the cache (``$DIFFRT_CACHE`` or ``~/.cache/diffrt``) on first use. Names load lazily, so ``diffrt export``
and ``diffrt --help`` start without importing torch.
"""

from ..core.lazy import lazy_attributes

_NAMES = {
    "ArtifactError": "..models.artifacts", "default_cache_dir": "..models.artifacts",
    "model_hash": "..models.artifacts",
    "ExportError": ".onnx_export", "ensure_onnx": ".onnx_export", "export_onnx": ".onnx_export",
    "open_export": ".onnx_export",
    "Dim": ".specs", "GraphSpec": ".specs", "ShapeRanges": ".specs", "TensorSpec": ".specs", "graph_profile": ".specs",
    "graph_specs": ".specs", "input_profile_shapes": ".specs",
    "build_engines": ".trt_build", "ensure_engines": ".trt_build", "open_engines": ".trt_build",
    "OnnxSource": ".sources", "EngineSource": ".sources",
}  # fmt: skip
__all__ = sorted(_NAMES)

__getattr__ = lazy_attributes(__name__, _NAMES)
