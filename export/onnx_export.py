"""Export a pipeline's graphs to ONNX: one file per graph plus ``manifest.json``, checked against torch.

Exporter: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) by default. On these
models its graphs have twice the nodes of the dynamo exporter's (shape arithmetic), but once ONNX Runtime
has folded that they run as fast (measured on the tiny preset, CPU EP: within 15% either way per graph
and batch) and match torch as closely (~1e-6); it exports 10-15x faster (the tiny model's five graphs in
4 s against 53 s on 2 cores: this matters for export on first use and for SD-sized U-Nets), takes plain
dynamic axes, writes opset 17 (read by every TensorRT 8.6+ parser; NVIDIA's own diffusion demo exports
this way) and needs no onnxscript. ``exporter="dynamo"`` is there too (needs onnxscript); its dims are
declared from the specs as multiples of the latent factor. It is FLUX.1's default (``exporter=None`` takes
the family's): the TorchScript tracer freezes the batch and token counts inside diffusers' rotary-embedding
and attention reshapes, so its graphs ran at the traced shapes only. SD3 keeps TorchScript: torch.export
specializes its cropped position embedding to the traced size.

fp16: the graphs are exported from a float16 copy of the modules, then every normalization (GroupNorm's
InstanceNormalization, LayerNormalization) and softmax is wrapped in casts so its statistics and
exponentials run in float32 on every provider; each graph's output is compared with the float32 torch
module, and an export beyond the precision's bound fails instead of writing a wrong graph.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models import artifacts, families
from ..models.artifacts import file_record
from ..models.families.base import PositionalGraph
from . import cache, external_data
from .modules import graph_module, run_module
from .onnx_ops import torchscript_symbolics
from .ort import ort_session, session_options
from .specs import (
    PRECISIONS,
    ShapeRanges,
    graph_names,
    graph_profile,
    graph_specs,
    input_profile_shapes,
    pixel_multiple,
)

log = logging.getLogger(__name__)


def graph_files(record: dict) -> list[dict]:
    """The file records of one graph's ONNX entry (the earlier name of ``artifacts.record_files("onnx", ...)``)."""
    return artifacts.record_files("onnx", record)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
OPSET_RANGE = {"torchscript": (14, 20), "dynamo": (18, 23)}  # 14: first with attention; 18: dynamo's minimum
PARITY_BOUNDS = {"fp32": 1e-4, "fp16": 2e-2}  # max |onnx - torch fp32| / max |torch fp32| per output
FP16_MARGIN = 1.25  # an fp16 graph past its bound may add this much to torch's own float16 error, no more
# What an exporter holds on top of the loaded model, per byte of the graph's weights (a 2.2 GB graph on this
# CPU, tests/export: TorchScript 2.0, it builds the whole ONNX protobuf in memory and then its serialized bytes;
# dynamo 0.1, it writes each tensor straight from torch). An fp16 export of fp32 weights adds its fp16 copy.
EXPORTER_MEMORY = {"torchscript": 2.0, "dynamo": 0.1}
FP32_OPS = ("Softmax", "InstanceNormalization", "LayerNormalization", "GroupNormalization")
VERSION_PACKAGES = ("torch", "onnx", "diffusers", "transformers")  # what the ONNX bytes depend on


class ExportError(ValueError):
    """An export that could not be made or failed its parity check."""


@dataclass(frozen=True)
class OnnxSettings:
    precision: str = "fp32"
    opset: int | None = None
    exporter: str = "torchscript"

    def resolved(self) -> OnnxSettings:
        if self.precision not in PRECISIONS:
            raise ValueError(f"ONNX precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        opset = DEFAULT_OPSET[self.exporter] if self.opset is None else self.opset
        low, high = OPSET_RANGE[self.exporter]
        if not isinstance(opset, int) or isinstance(opset, bool) or not low <= opset <= high:
            raise ValueError(
                f"opset for the {self.exporter} exporter must be an integer in [{low}, {high}], got {opset!r}"
            )
        return OnnxSettings(self.precision, opset, self.exporter)


# ------------------------------------------------------------------------------------------ public API
def default_exporter(components, exporter: str | None) -> str:
    """``exporter``, or the model family's default when None (see the module docstring)."""
    return exporter or families.get(components.family).onnx_exporter


def export_onnx(
    pipe, out_dir, *, precision: str = "fp32", opset: int | None = None, exporter: str | None = None,
    graphs: list[str] | None = None, ranges: ShapeRanges | None = None, force: bool = False,
) -> dict:  # fmt: skip
    """Write one ONNX file per graph of ``pipe`` (a Pipeline or its Components) and ``manifest.json`` into
    ``out_dir``; return the manifest. Graphs already there for the same model and settings, with intact
    files, are kept unless ``force``. Once the folder holds every graph of a deployable model it also gets
    its deployment record (:mod:`diffrt.models.deployment`): ``diffrt.load(out_dir, backend="onnxruntime")`` then runs
    it alone."""
    components = getattr(pipe, "components", pipe)
    settings = OnnxSettings(precision, opset, default_exporter(components, exporter)).resolved()
    settings = fitting_exporter(components, settings, graphs or graph_names(components), named=exporter is not None)
    ranges = (ranges or ShapeRanges()).resolved(components)
    manifest = _export_folder(components, Path(out_dir), settings, graphs, ranges, artifacts.model_hash(components),
                              force)  # fmt: skip
    if set(manifest["graphs"]) >= set(graph_names(components)):  # every graph there: it can run on its own
        manifest = cache.add_deployment(components, Path(out_dir), f"the ONNX export of {components.name}")
    return manifest


def ensure_onnx(
    components, *, precision: str = "fp32", opset: int | None = None, exporter: str | None = None,
    graphs: list[str] | None = None, cache_dir=None, model_hash: str | None = None,
) -> tuple[Path, dict]:  # fmt: skip
    """The cached export of ``components`` for these settings, exporting (or repairing) what is missing.
    Returns (folder, manifest)."""
    settings = OnnxSettings(precision, opset, default_exporter(components, exporter)).resolved()
    wanted = graphs or graph_names(components)
    settings = fitting_exporter(components, settings, wanted, named=exporter is not None)
    mhash = model_hash or artifacts.model_hash(components)
    folder = onnx_cache_folder(components, settings, mhash, cache_dir)
    manifest = cache.cached(folder, "onnx", _export_key(components, settings, mhash), wanted)
    if manifest is not None:
        return folder, manifest
    ranges = ShapeRanges().resolved(components)
    return folder, _export_folder(components, folder, settings, wanted, ranges, mhash, force=False)


def export_memory(components, graph: str, settings: OnnxSettings) -> int:
    """Bytes an export of ``graph`` needs on top of the loaded model (EXPORTER_MEMORY)."""
    from ..core.graphspec import TORCH_DTYPES

    source = families.model(components).graph_source(graph)
    tensors = [*source.parameters(), *source.buffers()]
    weights = sum(t.numel() * (TORCH_DTYPES[settings.precision].itemsize if t.is_floating_point() else t.itemsize)
                  for t in tensors)  # fmt: skip
    copy = weights if tensors and tensors[0].dtype != TORCH_DTYPES[settings.precision] else 0
    return int(weights * EXPORTER_MEMORY[settings.exporter]) + copy


def fitting_exporter(components, settings: OnnxSettings, graphs: list[str], named: bool) -> OnnxSettings:
    """``settings``, once every graph's export fits in the memory this machine has available: with the default
    TorchScript exporter too large for a graph, the dynamo exporter instead (a log line says so); an exporter
    that was named, or dynamo, that does not fit is refused before anything is exported, with the numbers."""
    from ..core.memory import available_bytes

    graphs = [g for g in graphs if g in graph_names(components)]  # unknown names are refused by the export itself
    if not graphs:
        return settings
    free, where = available_bytes(torch.device("cpu"))
    largest = max(graphs, key=lambda g: export_memory(components, g, settings))
    need = export_memory(components, largest, settings)
    if need <= free:
        return settings
    if not named and settings.exporter == "torchscript":
        dynamo = OnnxSettings(settings.precision, None, "dynamo").resolved()
        if export_memory(components, largest, dynamo) <= free:
            log.warning("exporting %s with the dynamo exporter: the TorchScript one would need %.1f GB for %s, %.1f "
                        "GB is %s", components.name, need / 1e9, largest, free / 1e9, where)  # fmt: skip
            return dynamo
    raise ExportError(f"exporting {largest} of {components.name} with the {settings.exporter} exporter needs about "
                      f"{need / 1e9:.1f} GB beside the loaded model, but {free / 1e9:.1f} GB is {where}: export "
                      "fewer graphs at a time, in another precision, or on a machine with more memory")  # fmt: skip


def onnx_cache_folder(components, settings: OnnxSettings, mhash: str, cache_dir=None) -> Path:
    """``CACHE/onnx/NAME-MODELHASH/PRECISION-opsetN-EXPORTER-KEY``: one folder per model and settings."""
    key = _export_key(components, settings, mhash)
    root = artifacts.resolve_cache_dir(cache_dir) / "onnx" / f"{artifacts.safe_name(components.name)}-{mhash[:16]}"
    return root / f"{settings.precision}-opset{settings.opset}-{settings.exporter}-{key[:12]}"


def open_export(folder, components=None, graphs: list[str] | None = None, model_hash: str | None = None) -> dict:
    """Read and verify an export folder (e.g. one ``export_onnx`` wrote) before using its graphs: it must
    have a manifest, be of ``components``' weights when given, and its files must match their hashes."""
    if components is not None and model_hash is None:
        model_hash = artifacts.model_hash(components)
    return artifacts.open_folder(folder, "onnx", graphs, model_hash)


def _weights_dtype(components) -> str:
    return str(components.denoiser.dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------- internals
def _export_key(components, settings: OnnxSettings, mhash: str) -> str:
    specs = graph_specs(components)
    return artifacts.key_hash({
        "model": mhash, "precision": settings.precision, "opset": settings.opset, "exporter": settings.exporter,
        "versions": artifacts.library_versions(*VERSION_PACKAGES),
        "graphs": {name: spec.signature() for name, spec in specs.items()},
    })  # fmt: skip


def _export_folder(components, folder: Path, settings, graphs, ranges, mhash: str, force: bool) -> dict:
    specs = graph_specs(components)
    wanted = graphs or list(specs)
    unknown = [g for g in wanted if g not in specs]
    if unknown:
        raise ValueError(f"unknown graph(s) {unknown}; this model has {list(specs)}")
    key = _export_key(components, settings, mhash)
    what = f"the ONNX export of {components.name}"

    def make(name: str) -> dict:
        log.info("exporting %s/%s to ONNX (%s, opset %d)", components.name, name, settings.precision, settings.opset)
        return _export_graph(components, specs[name], settings, folder, ranges, mhash)

    cache.fill(folder, "onnx", key, wanted, what=what, make=make, force=force,
               new_manifest=lambda: _new_manifest(components, settings, mhash, key, ranges))  # fmt: skip

    def new_ranges(manifest: dict) -> bool:  # new profiles for kept graphs: their files do not change
        if manifest["ranges"] == ranges.as_dict():
            return False
        manifest["ranges"] = ranges.as_dict()
        for name, record in manifest["graphs"].items():
            record.update(_describe(specs[name], settings.precision, ranges))
        return True

    return cache.update(folder, what, new_ranges)


def _new_manifest(components, settings, mhash, key, ranges) -> dict:
    return {
        "format": artifacts.EXPORT_FORMAT,
        "kind": "onnx",
        "key": key,
        "model": {
            "name": components.name,
            "family": components.family,
            "hash": mhash,
            "dtype": _weights_dtype(components),
        },
        "precision": settings.precision,
        "opset": settings.opset,
        "exporter": settings.exporter,
        "versions": artifacts.library_versions(*VERSION_PACKAGES, "onnxruntime"),
        "ranges": ranges.as_dict(),
        "graphs": {},
    }


def _export_graph(components, spec, settings: OnnxSettings, folder: Path, ranges: ShapeRanges, mhash: str) -> dict:
    """Export, post-process, check and measure one graph in a scratch folder; rename it in only if it passed."""
    import onnx

    start = time.perf_counter()
    with artifacts.scratch_dir(folder) as scratch:
        path = scratch / f"{spec.name}.onnx"
        data_name = _write_graph(components, spec, settings, path, ranges, {"model_hash": mhash})
        onnx.checker.check_model(str(path))
        parity = measure_parity(components, spec, path, settings.precision, _parity_values(components, ranges))
        bound = PARITY_BOUNDS[settings.precision]
        if settings.precision == "fp16" and not parity["max_rel_error"] <= bound:
            bound = _fp16_bound(components, spec, parity, bound)
        if not parity["max_rel_error"] <= bound:
            raise ExportError(
                f"{spec.name}: the {settings.precision} ONNX graph differs from torch by "
                f"{parity['max_rel_error']:.3g} (relative), over the bound {bound:g}; not written"
            )
        record = {"onnx": file_record(path), "data": file_record(scratch / data_name) if data_name else None}
        if data_name:  # the data first: the .onnx that names it is renamed in last
            artifacts.move_into_place(scratch / data_name, folder / data_name)
        artifacts.move_into_place(path, folder / path.name)
    record.update(_describe(spec, settings.precision, ranges))
    record.update(parity=parity, export_seconds=round(time.perf_counter() - start, 2))
    return record


def _write_graph(components, spec, settings: OnnxSettings, path: Path, ranges: ShapeRanges, metadata: dict):
    """Trace ``spec``'s module into ``path`` (float32 islands for fp16, metadata); the data file's name or None."""
    module = graph_module(components, spec.name, settings.precision)
    m = pixel_multiple(components)
    trace_values = within_limits(spec, {"batch": 2, "height": 2 * m, "width": 3 * m, "sequence": ranges.sequence[1]})
    raw = trace_graph(module, spec, settings, path, trace_values)
    del module  # an fp16 copy's memory back before the graph is rewritten
    return finish_graph(raw, path, spec.name, settings, metadata)


def trace_graph(module, spec, settings: OnnxSettings, path: Path, values: dict[str, int]) -> Path:
    """The exporter's own file for ``module`` traced at shape ``values``, in ``path``'s folder under raw/ (its
    weights beside it when the exporter keeps them apart)."""
    device = next(module.parameters()).device
    inputs = spec.sample_inputs(values, settings.precision, generator=torch.Generator().manual_seed(0), device=device)
    raw = path.parent / "raw" / path.name
    raw.parent.mkdir(exist_ok=True)
    _run_exporter(module, spec, inputs, raw, settings)
    return raw


def finish_graph(raw: Path, path: Path, name: str, settings: OnnxSettings, metadata: dict) -> str | None:
    """``raw`` rewritten into ``path``: float32 islands for fp16, diffrt's metadata, the weights inside or in one
    data file by their size (:mod:`diffrt.export.external_data`); the data file's name or None."""
    import onnx

    model = onnx.load(str(raw), load_external_data=False)  # weights stay on disk while the graph is edited
    promoted = promote_mixed_concats(model)
    if promoted:
        log.info("%s: %d concatenations of float16 and float32 inputs cast to float32", name, promoted)
    if settings.precision == "fp16":
        kept = keep_fp32(model, FP32_OPS)
        log.info("%s: %d normalization/softmax nodes kept in float32", name, kept)
    for key, value in {"graph": name, "precision": settings.precision, **metadata}.items():
        model.metadata_props.add(key=f"diffrt.{key}", value=value)
    return external_data.save(model, path, raw.parent)


def _describe(spec, precision: str, ranges: ShapeRanges) -> dict:
    """The manifest's account of a graph: IO names, dims and dtypes; its engine profile."""
    profile = graph_profile(spec, ranges)

    def tensors(specs):
        return [[t.name, t.describe(), str(t.torch_dtype(precision)).removeprefix("torch.")] for t in specs]

    return {
        "inputs": tensors(spec.inputs),
        "outputs": tensors(spec.outputs),
        "profile": {k: list(v) for k, v in profile.items()},
        "profile_shapes": {n: [list(s) for s in t] for n, t in input_profile_shapes(spec, profile).items()},
    }


def _run_exporter(module, spec, inputs: dict, path: Path, settings: OnnxSettings) -> None:
    if settings.exporter == "dynamo":
        from ..core.optional import require

        require("onnxscript", feature=f"exporting {spec.name} with the dynamo exporter")
    common = dict(input_names=spec.input_names, output_names=spec.output_names, opset_version=settings.opset)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches: parity is checked below
        try:
            if settings.exporter == "torchscript":
                # positional, in the spec's order: the TorchScript exporter drops keyword inputs that the forward
                # signature does not name (a controlled U-Net's ControlNet residuals)
                positional = tuple(inputs[name] for name in spec.input_names)
                with torchscript_symbolics(settings.opset):
                    torch.onnx.export(PositionalGraph(module, spec.input_names), positional, str(path),
                                      dynamic_axes=spec.dynamic_axes(), dynamo=False, do_constant_folding=True,
                                      **common)  # fmt: skip
            else:
                # its registry warns about every torchvision op it cannot find: nothing here uses them
                registry = logging.getLogger("torch.onnx._internal.exporter._registration")
                level = registry.level
                registry.setLevel(logging.ERROR)
                try:
                    program = torch.onnx.export(module, (), kwargs=inputs, dynamic_shapes=_dynamo_shapes(spec),
                                                dynamo=True, optimize=True, verbose=False, **common)  # fmt: skip
                finally:
                    registry.setLevel(level)
                program.save(str(path), external_data=True)  # read back without loading the weights
        except ExportError:
            raise
        except Exception as err:  # the exporters raise many types; say which graph failed and why
            raise ExportError(f"exporting {spec.name} with the {settings.exporter} exporter failed: {err}") from err


def _dynamo_shapes(spec) -> dict:
    """torch.export dims: one per shape variable, stepping by the graph's multiple (in the tensor's units)."""
    from torch.export import Dim

    bases = {var: Dim(f"{var}_steps", min=1) for var in spec.variables}
    shapes = {}
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.dims):
            if hasattr(d, "var"):
                step = spec.multiples.get(d.var, 1) // d.divisor
                axes[i] = bases[d.var] * step if step > 1 else bases[d.var]
        shapes[t.name] = axes
    return shapes


def keep_fp32(model, op_types=FP32_OPS) -> int:
    """Wrap every float16 node of ``op_types`` in Casts so it computes in float32 (its float16 inputs cast
    up, its first output cast back down); returns how many nodes were wrapped."""
    from onnx import TensorProto, helper

    types = elem_types(model)
    nodes, wrapped = [], 0
    for node in model.graph.node:
        if node.op_type not in op_types or types.get(node.input[0]) != TensorProto.FLOAT16:
            nodes.append(node)
            continue
        tag = node.name or f"{node.op_type}_{wrapped}"
        for i, name in enumerate(node.input):
            if name and types.get(name) == TensorProto.FLOAT16:
                up = f"{name}/fp32/{tag}/{i}"
                nodes.append(helper.make_node("Cast", [name], [up], to=TensorProto.FLOAT, name=f"{tag}/to_fp32_{i}"))
                node.input[i] = up
        out = node.output[0]
        node.output[0] = f"{out}/fp32"
        nodes += [
            node,
            helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT16, name=f"{tag}/to_fp16"),
        ]
        wrapped += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return wrapped


def promote_mixed_concats(model) -> int:
    """Cast the float16 inputs of a Concat that also takes float32 ones to float32, as torch promotes them: the
    dynamo exporter writes such a Concat as it is (SDXL's added-condition embedding in float16: float16 text
    embeddings and float32 time embeddings), which ONNX Runtime refuses to load. Returns how many it mended."""
    from onnx import TensorProto, helper

    types = elem_types(model)
    nodes, outputs = [], set()
    for node in model.graph.node:
        if node.op_type == "Concat" and {types.get(n) for n in node.input} == {TensorProto.FLOAT16, TensorProto.FLOAT}:
            tag = node.name or f"Concat_{len(outputs)}"
            for i, name in enumerate(node.input):
                if types.get(name) == TensorProto.FLOAT16:
                    up = f"{name}/fp32/{tag}/{i}"
                    nodes.append(helper.make_node("Cast", [name], [up], to=TensorProto.FLOAT, name=f"{tag}/up_{i}"))
                    node.input[i] = up
            outputs.update(node.output)
        nodes.append(node)
    if outputs:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        for value in model.graph.value_info:  # the mended outputs are float32 now
            if value.name in outputs:
                value.type.tensor_type.elem_type = TensorProto.FLOAT
    return len(outputs)


def elem_types(model) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference (weights need not be loaded)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def within_limits(spec, values: dict[str, int]) -> dict[str, int]:
    """Shape values clipped to the graph's limits: one shared token count, CLIP's graphs capped at 77."""
    clipped = dict(values)
    for var, (low, high) in spec.limits.items():
        if var in clipped:
            clipped[var] = max(low, clipped[var] if high is None else min(high, clipped[var]))
    return clipped


# --------------------------------------------------------------------------------------------- parity
def _parity_values(components, ranges: ShapeRanges) -> list[dict[str, int]]:
    """Two small shape sets unlike the traced one (batch 2 at 2m x 3m): batch 1 and 3, transposed sizes."""
    m = pixel_multiple(components)
    seq = ranges.sequence[1]
    return [
        {"batch": 1, "height": 3 * m, "width": 2 * m, "sequence": seq},
        {"batch": 3, "height": 2 * m, "width": 2 * m, "sequence": seq},
    ]


def _fp16_bound(components, spec, parity: dict, bound: float) -> float:
    """The fp16 bound for a graph whose own arithmetic in float16 is past it: FLUX.1's transformer (tiny-flux,
    random weights) in float16 differs from float32 by 2.5% in torch itself, as much as its ONNX graph does. Such
    a graph may differ by up to ``FP16_MARGIN`` times torch's own float16 error on the same inputs, no more."""
    floor = torch_fp16_error(components, spec, parity["shapes"])
    parity.update(torch_fp16_error=floor, bound=max(bound, FP16_MARGIN * floor))
    log.info("%s: torch's own float16 differs from float32 by %.3g: the fp16 bound is %.3g", spec.name, floor,
             parity["bound"])  # fmt: skip
    return parity["bound"]


def torch_fp16_error(components, spec, shape_sets: list[dict[str, int]], seed: int = 1) -> float:
    """Max relative error of ``spec``'s torch module in float16 against float32, on the inputs
    :func:`measure_parity` draws with the same ``seed``."""
    reference = graph_module(components, spec.name, "fp32")
    half = graph_module(components, spec.name, "fp16")
    device = next(reference.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for values in shape_sets:
        inputs = spec.sample_inputs(within_limits(spec, values), "fp32", generator=generator)
        expected = run_module(reference, spec, {k: v.to(device) for k, v in inputs.items()})
        got = run_module(half, spec, {t.name: inputs[t.name].to(device, t.torch_dtype("fp16")) for t in spec.inputs})
        for name, ref in expected.items():
            ref = ref.float()
            worst = max(worst, float((got[name].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return worst


def measure_parity(components, spec, path, precision: str, shape_sets: list[dict[str, int]], seed: int = 1) -> dict:
    """Max relative error (max |onnx - torch| / max |torch|, per output) of the ONNX graph at ``path``,
    run on the CPU execution provider, against the float32 torch module, on fresh random inputs."""
    options = session_options()
    # prepacking copies every weight while the session loads (2x the graph's weights at peak); without it the
    # weights are mapped from the file: what keeps an export's parity check within the memory of the export
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False  # a check runs a few times: the arena's growth buys nothing here
    session = ort_session(path, options=options)
    reference = graph_module(components, spec.name, "fp32")
    device = next(reference.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    worst, per_output = 0.0, {}
    for values in shape_sets:
        inputs = spec.sample_inputs(within_limits(spec, values), "fp32", generator=generator)
        expected = run_module(reference, spec, {k: v.to(device) for k, v in inputs.items()})
        feeds = {t.name: inputs[t.name].to(t.torch_dtype(precision)).numpy() for t in spec.inputs}
        got = dict(zip(spec.output_names, session.run(spec.output_names, feeds), strict=True))
        for name, ref in expected.items():
            ref = ref.float().cpu().numpy()
            err = float(np.abs(got[name].astype(np.float32) - ref).max() / max(float(np.abs(ref).max()), 1e-12))
            per_output[name] = max(per_output.get(name, 0.0), err)
            worst = max(worst, err)
    return {
        "max_rel_error": worst,
        "per_output": per_output,
        "bound": PARITY_BOUNDS[precision],
        "reference": "torch float32 eager",
        "provider": "CPUExecutionProvider",
        "shapes": shape_sets,
    }
