"""The TensorRT backend: engines built from the ONNX exports, run on torch's CUDA stream with named buffers.

Graph inputs and outputs are the family's graph specs. Engines come from the engine cache (built on first use,
:class:`diffrt.export.sources.EngineSource`), a folder ``build_engines`` wrote (``engine_dir=``) or a deployed
folder's own. Each call binds torch tensors by name (``set_tensor_address``) and enqueues on the current
stream: no host copies and no syncs. With ``cuda_graphs=True`` each input shape gets its own execution
context, captured once as a CUDA graph and replayed. ``tensorrt`` is imported only when the backend is created.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..export.tensorrt import INSTALL_HINT, check_precision, import_tensorrt, refit_engine
from .exported import ExportedBackend, artifact_source
from .graphs import LoopGraphCache

log = logging.getLogger(__name__)

_DTYPE_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SOURCE_OPTIONS = ("cache_dir", "engine_dir", "ranges", "refit", "workspace_bytes")  # where engines come from
OPTIONS = ("precision", "cuda_graphs", "max_graphs", *SOURCE_OPTIONS)
def is_available() -> tuple[bool, str]:
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
        self.cuda_graphs = cuda_graphs
        self.captured = LoopGraphCache(max_graphs, capture=self._capture_shape, cuda_pool=True)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.spec.check_inputs(inputs, self.profile)  # outside the profile: a clear error, not a TensorRT one
        tensors = {n: inputs[n].detach().to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        if self.cuda_graphs:  # one graph per input shape (the cache keys on every input's shape and dtype)
            return self.captured.run(("engine", self.path.name), None, tensors)
        stream = torch.cuda.current_stream(self.device)
        outputs = _bind(self, self.context, tensors)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path.name}")
        return outputs  # ordered on torch's stream: the inputs' memory is not reused before the engine is done

    def _capture_shape(self, fn, inputs: dict[str, torch.Tensor], pool=None) -> _CapturedShape:
        return _CapturedShape(self, inputs, pool)

    def refit(self, onnx_path: Path) -> None:
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

    def __init__(self, engine: _Engine, tensors: dict[str, torch.Tensor], pool=None):
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
        with torch.cuda.graph(self.graph, stream=stream, pool=pool):
            self.context.execute_async_v3(stream.cuda_stream)
        torch.cuda.current_stream(engine.device).wait_stream(stream)

    def __call__(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        for name, x in tensors.items():
            self.inputs[name].copy_(x)
        self.graph.replay()
        return {n: o.clone() for n, o in self.outputs.items()}


class TensorRTBackend(ExportedBackend):
    name = "tensorrt"

    def __init__(self, components, device: torch.device, dtype: torch.dtype, *, artifacts, precision=None,
                 cuda_graphs=False, max_graphs=4):  # fmt: skip
        self.trt = import_tensorrt()
        precision = check_precision(precision or _DTYPE_PRECISION[dtype])
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; use precision 'fp16'")
        self.cuda_graphs, self.max_graphs = bool(cuda_graphs), int(max_graphs)
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        super().__init__(components, device, dtype, artifacts, precision)
        self.open_all()
        log.info("tensorrt backend: %s engines from %s", self.precision, self.folder(self.precision)[0])

    def open_runner(self, folder: Path, manifest: dict, graph: str) -> _Engine:
        record = manifest["graphs"][graph]
        return _Engine(self.trt, self.runtime, folder / record["engine"]["file"], self.specs[graph], record,
                       self.device, self.cuda_graphs, self.max_graphs)  # fmt: skip

    def onnx_file(self, graph: str) -> Path:
        """The base model's ONNX export the engine of ``graph`` was built from (the export cache's)."""
        self._check_refittable()
        return self.artifacts.refit_onnx(self.components, graph, self.graph_precision(graph))

    def replace_initializers(self, graph: str, arrays: dict, restored: set) -> None:
        """Refit the touched weights of ``graph``'s engine by their ONNX initializer names (LoRAs)."""
        engine = self.runner(graph)
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        refitter = self.trt.Refitter(engine.engine, logger)
        for name, array in arrays.items():
            if not refitter.set_named_weights(name, self.trt.Weights(array)):
                raise ValueError(f"TensorRT has no refittable weight {name!r} in {engine.path.name}")
        if not refitter.refit_cuda_engine():
            raise ValueError(f"TensorRT rejected the new weights of {engine.path.name}")
        engine.captured.clear()  # graphs captured before the refit may hold the old weights' launches

    def _check_refittable(self) -> None:
        if not getattr(self.artifacts, "refit", False):
            raise ValueError("engines were built without refit, so they take no LoRA: load with refit=True")

    def refit(self, components) -> None:
        """Swap in the weights of ``components`` (same architecture, e.g. merged LoRA) without rebuilding:
        every loaded engine is refitted from the ONNX export of the new weights (made through the cache)."""
        self._check_refittable()
        for graph, engine in self._runners.items():
            engine.refit(self.artifacts.refit_onnx(components, graph, self.graph_precision(graph)))
        self.components = components


def create(components, device, dtype, **options) -> TensorRTBackend:
    """The backend over the model's engines: a deployed folder's own, else built through the cache."""
    from ..export.sources import EngineSource

    if device.type != "cuda":
        raise ValueError(f"the tensorrt backend runs on a CUDA GPU: load with device='cuda', not {str(device)!r}")
    given = {k: options.pop(k) for k in SOURCE_OPTIONS if k in options}
    source = artifact_source(components, given) or EngineSource(components, device, **given)
    return TensorRTBackend(components, device, dtype, artifacts=source, **options)
