"""Build TensorRT engines from the ONNX exports, with the TensorRT Python API (imported lazily).

Each graph gets one engine with one optimization profile (min/opt/max shapes from the export specs and the
pipeline's :class:`~diffrt.export.specs.ShapeRanges`). Precisions:

- ``fp32``: the fp32 ONNX graph, TF32 off (float32 results, comparable with torch);
- ``fp16``: the fp16 ONNX graph (normalizations and softmax already cast to float32 there) in a strongly
  typed network, so TensorRT keeps exactly those types;
- ``bf16``: the fp32 ONNX graph with the BF16 builder flag; normalization, softmax and reduction layers are
  constrained to float32.

A timing cache per GPU and TensorRT version (shared by all models) makes rebuilds fast; ``refit=True``
builds refittable engines whose weights :func:`refit_engine` can replace from another export of the same
architecture. Engines are cached like the ONNX files: keyed by model hash, graph, precision, profile,
library versions and GPU; written atomically under a lock; checked against their SHA-256 before loading.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..models import artifacts
from ..models.artifacts import file_record
from . import cache
from .onnx_export import ExportError, ensure_onnx, export_onnx, open_export
from .specs import ShapeRanges, graph_names, graph_profile, graph_specs, input_profile_shapes
from .tensorrt import check_precision, import_tensorrt

log = logging.getLogger(__name__)

FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")  # kept float32 in bf16 builds


def onnx_precision_for(precision: str) -> str:
    """The ONNX export an engine is built from: fp16 engines from the fp16 graphs, the others from fp32."""
    return "fp16" if check_precision(precision) == "fp16" else "fp32"


def device_signature(device=None) -> dict:
    """What an engine is specific to besides TensorRT's version: the GPU model and CUDA."""
    index = torch.device(device or "cuda").index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}", "cuda": torch.version.cuda}


def engine_key(model_hash: str, precision: str, ranges: ShapeRanges, versions: dict, device: dict, refit: bool) -> str:
    """The key of an engine folder: everything an engine's bytes depend on but the graph (its file name)."""
    return artifacts.key_hash({
        "model": model_hash, "precision": check_precision(precision), "ranges": ranges.as_dict(),
        "versions": versions, "device": device, "refit": bool(refit),
    })  # fmt: skip


def engine_versions() -> dict:
    return artifacts.library_versions("tensorrt", "torch", "onnx", "diffusers", "transformers")


# ------------------------------------------------------------------------------------------------ build
def build_engine(
    onnx_path: Path, engine_path: Path, *, profile_shapes: dict, precision: str, timing_cache: Path | None = None,
    refit: bool = False, workspace_bytes: int | None = None,
) -> None:  # fmt: skip
    """Parse ``onnx_path``, build one engine with one optimization profile, write it atomically."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = precision == "fp16"  # the fp16 ONNX carries its float32 islands: keep its types
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        _keep_layers_fp32(trt, network)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes.items():
        profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
    config.add_optimization_profile(profile)
    cache = _load_timing_cache(config, timing_cache)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    log.info("built %s in %.1f s", engine_path.name, time.perf_counter() - start)
    artifacts.atomic_write_bytes(engine_path, bytes(serialized))
    if timing_cache is not None:
        artifacts.atomic_write_bytes(timing_cache, bytes(cache.serialize()))


def _keep_layers_fp32(trt, network) -> None:
    kept = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES if hasattr(trt.LayerType, name)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kept:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def _load_timing_cache(config, path: Path | None):
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception as err:  # a damaged timing cache only costs time: start a fresh one
        log.warning("ignoring the unreadable timing cache %s: %s", path, err)
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config.get_timing_cache()


# ------------------------------------------------------------------------------------- engine folders
def ensure_engines(
    components, *, precision: str, ranges: ShapeRanges | None = None, graphs: list[str] | None = None,
    cache_dir=None, refit: bool = False, workspace_bytes: int | None = None, model_hash: str | None = None,
    device=None,
) -> tuple[Path, dict]:  # fmt: skip
    """The cached engines of ``components`` (building, or rebuilding corrupt ones, as needed)."""
    import_tensorrt()
    mhash = model_hash or artifacts.model_hash(components)
    ranges = (ranges or ShapeRanges()).resolved(components)
    graphs = graphs or graph_names(components)
    onnx_folder, onnx_manifest = ensure_onnx(
        components, precision=onnx_precision_for(precision), graphs=graphs, cache_dir=cache_dir, model_hash=mhash
    )
    key = engine_key(mhash, precision, ranges, engine_versions(), device_signature(device), refit)
    root = artifacts.resolve_cache_dir(cache_dir) / "tensorrt"
    folder = root / f"{artifacts.safe_name(components.name)}-{mhash[:16]}" / f"{precision}-{key[:12]}"
    timing = root / f"timing-{artifacts.key_hash([engine_versions()['tensorrt'], device_signature(device)])[:12]}.cache"
    manifest = _engine_folder(
        components, folder, onnx_folder, onnx_manifest, precision, ranges, graphs, key, mhash,
        dict(refit=refit, workspace_bytes=workspace_bytes, timing_cache=timing), device,
    )  # fmt: skip
    return folder, manifest


def build_engines(
    pipe, out_dir, *, precision: str = "fp16", ranges: ShapeRanges | None = None, graphs: list[str] | None = None,
    refit: bool = False, workspace_bytes: int | None = None, opset: int | None = None,
) -> dict:  # fmt: skip
    """Export ``pipe`` to ONNX under ``OUT/onnx`` and build its engines into ``OUT`` (``manifest.json``
    beside them); return the engine manifest."""
    import_tensorrt()
    components = getattr(pipe, "components", pipe)
    out_dir = Path(out_dir)
    ranges = (ranges or ShapeRanges()).resolved(components)
    mhash = artifacts.model_hash(components)
    onnx_manifest = export_onnx(components, out_dir / "onnx", precision=onnx_precision_for(precision), opset=opset,
                                graphs=graphs, ranges=ranges)  # fmt: skip
    device = getattr(pipe, "device", None)
    key = engine_key(mhash, precision, ranges, engine_versions(), device_signature(device), refit)
    options = dict(refit=refit, workspace_bytes=workspace_bytes, timing_cache=out_dir / "timing.cache")
    manifest = _engine_folder(components, out_dir, out_dir / "onnx", onnx_manifest, precision, ranges,
                              graphs or graph_names(components), key, mhash, options, device)  # fmt: skip
    if set(manifest["graphs"]) >= set(graph_names(components)):
        manifest = cache.add_deployment(components, out_dir, f"the TensorRT build of {components.name}")
    return manifest


def open_engines(folder, components=None, graphs=None, model_hash: str | None = None) -> dict:
    """Read and verify an engine folder (as ``build_engines`` wrote) before loading its engines."""
    if components is not None and model_hash is None:
        model_hash = artifacts.model_hash(components)
    return artifacts.open_folder(folder, "tensorrt", graphs, model_hash)


def _engine_folder(components, folder, onnx_folder, onnx_manifest, precision, ranges, graphs, key, mhash, options,
                   device) -> dict:  # fmt: skip
    specs = graph_specs(components)

    def new_manifest() -> dict:
        return {
            "format": artifacts.EXPORT_FORMAT, "kind": "tensorrt", "key": key,
            "model": {"name": components.name, "family": components.family, "hash": mhash},
            "precision": precision, "ranges": ranges.as_dict(), "versions": engine_versions(),
            "device": device_signature(device), "refit": bool(options["refit"]), "graphs": {},
        }  # fmt: skip

    def current(graph: str, record: dict) -> bool:  # built from the ONNX file that is there now
        return record.get("onnx_sha256") == onnx_manifest["graphs"][graph]["onnx"]["sha256"]

    def make(graph: str) -> dict:
        return _build_graph(specs[graph], onnx_folder, onnx_manifest["graphs"][graph], folder, precision, ranges,
                            options)  # fmt: skip

    return cache.fill(Path(folder), "tensorrt", key, graphs, what=f"TensorRT engines of {components.name}",
                      new_manifest=new_manifest, make=make, keep=current)  # fmt: skip


def _build_graph(spec, onnx_folder, onnx_record, folder, precision, ranges, options) -> dict:
    open_export(onnx_folder, graphs=[spec.name])  # the ONNX file must be intact before TensorRT reads it
    profile = graph_profile(spec, ranges)
    shapes = input_profile_shapes(spec, profile)
    engine_path = Path(folder) / f"{spec.name}.engine"
    start = time.perf_counter()
    build_engine(Path(onnx_folder) / onnx_record["onnx"]["file"], engine_path, profile_shapes=shapes,
                 precision=precision, timing_cache=options["timing_cache"], refit=options["refit"],
                 workspace_bytes=options["workspace_bytes"])  # fmt: skip
    return {
        "engine": file_record(engine_path),
        "onnx_sha256": onnx_record["onnx"]["sha256"],
        "profile": {k: list(v) for k, v in profile.items()},
        "profile_shapes": {n: [list(s) for s in triple] for n, triple in shapes.items()},
        "build_seconds": round(time.perf_counter() - start, 2),
    }
