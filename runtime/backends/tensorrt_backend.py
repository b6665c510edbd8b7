"""The TensorRT backend: engines built from the ONNX exports, run on torch's CUDA stream with named buffers.

Graph inputs and outputs are the torch backend's. Engines come from the engine cache (built on first use,
see :mod:`diffrt.export.trt_build`) or from a folder ``build_engines`` wrote (``engine_dir=``). Each call
binds torch tensors by name (``set_tensor_address``) and enqueues on the current stream: no host copies and
no syncs. With ``cuda_graphs=True`` each input shape gets its own execution context, captured once as a
CUDA graph and replayed. ``tensorrt`` is imported only when the backend is created.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_DTYPE_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_OPTIONS = ("precision", "cache_dir", "engine_dir", "ranges", "refit", "cuda_graphs", "max_graphs", "workspace_bytes")


def is_available() -> tuple[bool, str]:
    from ..export.trt_build import INSTALL_HINT

    if importlib.util.find_spec("tensorrt") is None:
        return False, f"the tensorrt package is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return False, "TensorRT needs a CUDA GPU; this machine has none"
    return True, ""


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32,
             trt.bfloat16: torch.bfloat16, trt.bool: torch.bool}  # fmt: skip
    if dtype not in table:
        raise ValueError(f"engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


class _Engine:
    """One deserialized engine: named IO, its profile for input checks, contexts per shape for CUDA graphs."""

    def __init__(self, trt, runtime, path: Path, spec, record: dict, device: torch.device, cuda_graphs: bool,
                 max_graphs: int):  # fmt: skip
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
        self.trt, self.path, self.spec, self.device = trt, path, spec, device
        self.profile = {k: tuple(v) for k, v in record["profile"].items()}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        if sorted(self.inputs) != sorted(spec.input_names) or sorted(self.outputs) != sorted(spec.output_names):
            raise ValueError(f"{path} has IO {self.inputs} -> {self.outputs}, not {spec.name}'s")
        self.context = self.engine.create_execution_context()
        self.cuda_graphs, self.max_graphs = cuda_graphs, max_graphs
        self.captured: OrderedDict[tuple, _CapturedShape] = OrderedDict()

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.spec.check_inputs(inputs, self.profile)  # outside the profile: a clear error, not a TensorRT one
        tensors = {n: inputs[n].detach().to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        if self.cuda_graphs:
            key = tuple((n, tuple(t.shape)) for n, t in tensors.items())
            if key not in self.captured:
                if len(self.captured) >= self.max_graphs:
                    self.captured.popitem(last=False)  # frees that shape's context and buffers
                self.captured[key] = _CapturedShape(self, tensors)
            self.captured.move_to_end(key)
            return self.captured[key](tensors)
        stream = torch.cuda.current_stream(self.device)
        outputs = _bind(self, self.context, tensors)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path.name}")
        return outputs  # ordered on torch's stream: the inputs' memory is not reused before the engine is done

    def refit(self, onnx_path: Path) -> None:
        from ..export.trt_build import refit_engine

        refit_engine(self.engine, onnx_path)
        self.captured.clear()  # graphs captured before the refit may hold the old weights' launches


def _bind(engine: _Engine, context, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Set input shapes and addresses; allocate the outputs at the shapes TensorRT infers."""
    for name, x in tensors.items():
        context.set_input_shape(name, tuple(x.shape))
        context.set_tensor_address(name, x.data_ptr())
    outputs = {}
    for name in engine.outputs:
        shape = tuple(context.get_tensor_shape(name))
        outputs[name] = torch.empty(shape, dtype=engine.dtypes[name], device=engine.device)
        context.set_tensor_address(name, outputs[name].data_ptr())
    return outputs


class _CapturedShape:
    """One input shape's context with static buffers, its enqueue captured as a CUDA graph."""

    def __init__(self, engine: _Engine, tensors: dict[str, torch.Tensor]):
        self.context = engine.engine.create_execution_context()
        self.inputs = {n: t.clone() for n, t in tensors.items()}
        self.outputs = _bind(engine, self.context, self.inputs)
        stream = torch.cuda.Stream(engine.device)
        stream.wait_stream(torch.cuda.current_stream(engine.device))
        # one plain enqueue first: TensorRT finishes deferred setup then, which a capture must not contain
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {engine.path.name}")
        stream.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.context.execute_async_v3(stream.cuda_stream)
        torch.cuda.current_stream(engine.device).wait_stream(stream)

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, x in tensors.items():
            self.inputs[name].copy_(x)
        self.graph.replay()
        return {n: o.clone() for n, o in self.outputs.items()}


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self, components, device: torch.device, dtype: torch.dtype, *, precision=None, cache_dir=None,
        engine_dir=None, ranges=None, refit=False, cuda_graphs=False, max_graphs=4, workspace_bytes=None,
    ):  # fmt: skip
        from ..export import artifacts, graph_specs
        from ..export.specs import ShapeRanges
        from ..export.trt_build import check_precision, import_tensorrt

        if device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on a CUDA GPU: load with device='cuda', not {str(device)!r}")
        self.trt = import_tensorrt()
        self.components, self.device, self.dtype = components, device, dtype
        self.precision = check_precision(precision or _DTYPE_PRECISION[dtype])
        if self.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; use precision 'fp16'")
        if isinstance(ranges, dict):
            ranges = ShapeRanges(**{k: tuple(v) for k, v in ranges.items()})
        if ranges is not None and not isinstance(ranges, ShapeRanges):
            raise ValueError(f"ranges must be a ShapeRanges or a dict of (min, opt, max) triples, got {ranges!r}")
        self.ranges = ranges
        self.refit_enabled, self.cuda_graphs, self.max_graphs = bool(refit), bool(cuda_graphs), int(max_graphs)
        self.workspace_bytes = workspace_bytes
        self.cache_dir = artifacts.resolve_cache_dir(cache_dir)
        self.engine_dir = None if engine_dir is None else Path(engine_dir)
        self.specs = graph_specs(components)
        self.model_hash = artifacts.model_hash(components)
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.vae_precision = self.precision
        self._engines: dict[str, _Engine] = {}
        self._folders: dict[str, tuple[Path, dict]] = {}
        self._folder(self.precision, list(self.specs))
        for graph in self.specs:
            if graph != "vae_encoder":  # (image-to-image only: loaded on first use)
                self._engine(graph)
        log.info("tensorrt backend: %s engines from %s", self.precision, self._folders[self.precision][0])

    def _folder(self, precision: str, graphs: list[str]) -> tuple[Path, dict]:
        from ..export.trt_build import ensure_engines, open_engines

        if self.engine_dir is not None and precision == self.precision:
            manifest = open_engines(self.engine_dir, self.components, graphs, model_hash=self.model_hash)
            if manifest["precision"] != precision:
                raise ValueError(f"{self.engine_dir} holds {manifest['precision']} engines, not {precision}")
            self._folders[precision] = (self.engine_dir, manifest)
        else:
            self._folders[precision] = ensure_engines(
                self.components, precision=precision, ranges=self.ranges, graphs=graphs, cache_dir=self.cache_dir,
                refit=self.refit_enabled, workspace_bytes=self.workspace_bytes, model_hash=self.model_hash,
                device=self.device,
            )  # fmt: skip
        return self._folders[precision]

    def _engine(self, graph: str) -> _Engine:
        if graph not in self._engines:
            precision = self.vae_precision if graph.startswith("vae") else self.precision
            if precision not in self._folders or graph not in self._folders[precision][1]["graphs"]:
                self._folder(precision, [graph])
            folder, manifest = self._folders[precision]
            record = manifest["graphs"][graph]
            self._engines[graph] = _Engine(self.trt, self.runtime, folder / record["engine"]["file"], self.specs[graph],
                                           record, self.device, self.cuda_graphs, self.max_graphs)  # fmt: skip
        return self._engines[graph]

    def run(self, graph: str, **inputs) -> dict[str, torch.Tensor]:
        if graph not in self.specs:
            raise ValueError(f"unknown graph {graph!r}; this model has {list(self.specs)}")
        return self._engine(graph).run(inputs)

    def upcast_vae(self) -> None:
        """Run the VAE from float32 engines from now on (fp16 VAEs overflow on some latents)."""
        if self.vae_precision == "fp32":
            return
        self._folder("fp32", ["vae_encoder", "vae_decoder"])
        self.vae_precision = "fp32"
        for graph in ("vae_encoder", "vae_decoder"):
            self._engines.pop(graph, None)

    def refit(self, components) -> None:
        """Swap in the weights of ``components`` (same architecture, e.g. merged LoRA) without rebuilding:
        their ONNX export is made (cached) and every loaded engine refitted from it."""
        from ..export import ensure_onnx
        from ..export.trt_build import onnx_precision_for

        if not self.refit_enabled:
            raise ValueError("engines were built without refit: create the backend with refit=True")
        for graph, engine in self._engines.items():
            precision = self.vae_precision if graph.startswith("vae") else self.precision
            folder, manifest = ensure_onnx(components, precision=onnx_precision_for(precision), graphs=[graph],
                                           cache_dir=self.cache_dir)  # fmt: skip
            engine.refit(folder / manifest["graphs"][graph]["onnx"]["file"])
        self.components = components


def create(components, device, dtype, **options) -> TensorRTBackend:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to the tensorrt backend; allowed: {', '.join(_OPTIONS)}")
    return TensorRTBackend(components, device, dtype, **options)
