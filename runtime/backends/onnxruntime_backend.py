"""The ONNX Runtime backend: the pipeline's graphs exported to ONNX and run in ONNX Runtime sessions.

Graph inputs and outputs are the family's graph specs, as for every backend, so the Pipeline is unchanged.
The graphs come from the export cache (exporting on first use, :class:`diffrt.export.sources.OnnxSource`), a
folder ``export_onnx`` wrote (``onnx_dir=``) or a deployed folder's own; their hashes are checked before a
session loads them.

Providers: the TensorRT, CUDA and CPU execution providers, in that order, from those installed (CPU only
for device "cpu"), or the list given as ``providers=``; ``provider_options={"cuda": {...}}`` adds or
overrides ONNX Runtime provider options. On CUDA the inputs and outputs are bound to torch's device
buffers (IO binding), so latents never leave the GPU.

Options (``diffrt.load(..., backend="onnxruntime", **options)``): providers, provider_options, precision
("fp32"/"fp16"; default from dtype), threads, cache_dir; and where the graphs come from: onnx_dir, opset,
exporter (:data:`SOURCE_OPTIONS`; cache_dir serves both).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core import optional
from ..export.ort import ort_session, session_options
from ..models.artifacts import ArtifactError, resolve_cache_dir
from .exported import ExportedBackend, artifact_source

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_DTYPE_PRECISION = {torch.float32: "fp32", torch.float16: "fp16"}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}
SOURCE_OPTIONS = ("onnx_dir", "opset", "exporter")  # where the graphs come from (OnnxSource's, with cache_dir)
OPTIONS = ("providers", "precision", "threads", "provider_options", "cache_dir", *SOURCE_OPTIONS)


def is_available() -> tuple[bool, str]:
    for module in ("onnxruntime", "onnx"):
        if not optional.installed(module):
            return False, f"the {module} package is not installed (pip install 'diffrt[onnx]')"
    return True, ""


def choose_providers(device: torch.device, requested=None, available=None) -> list[str]:
    """The execution providers to use, best first, always ending with the CPU one (ONNX Runtime's fallback
    for nodes the others lack). ``requested``: names or aliases (tensorrt, cuda, cpu), in priority order."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if requested is None:
        chosen = [p for p in PREFERENCE if p in available and (device.type == "cuda" or p not in GPU_PROVIDERS)]
        if device.type == "cuda" and not any(p in GPU_PROVIDERS for p in chosen):
            raise ValueError(
                "device 'cuda' asked for, but this onnxruntime has no GPU execution provider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use device='cpu'"
            )
    else:
        if isinstance(requested, str) or not requested:
            raise ValueError(f"providers must be a non-empty list of provider names, got {requested!r}")
        chosen = []
        for name in requested:
            full = PROVIDER_ALIASES.get(name, name)
            if full not in available:
                raise ValueError(
                    f"execution provider {name!r} is not available here; available: {', '.join(available)}"
                )
            if full in GPU_PROVIDERS and device.type != "cuda":
                raise ValueError(f"execution provider {full} runs on the GPU: load with device='cuda'")
            chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def resolve_precision(dtype: torch.dtype, precision: str | None) -> str:
    if precision is None:
        if dtype not in _DTYPE_PRECISION:
            raise ValueError(
                f"the onnxruntime backend runs float32 or float16 graphs; ONNX Runtime has no {dtype} kernels "
                "(use dtype float16 or float32, or the tensorrt backend for bfloat16)"
            )
        return _DTYPE_PRECISION[dtype]
    if precision not in ("fp32", "fp16"):
        raise ValueError(
            f"the onnxruntime backend's precision must be 'fp32' or 'fp16', got {precision!r} "
            "(ONNX Runtime's providers have no bfloat16 kernels for these graphs; use the tensorrt backend)"
        )
    return precision


def provider_options(provider: str, profile_shapes: dict, precision: str, device_id: int, cache: Path, user=None):
    """ONNX Runtime's options for ``provider`` (all strings): the GPU, and for the TensorRT EP the export's
    optimization profile, fp16 and an engine and timing cache under diffrt's cache; ``user`` entries win."""
    options: dict = {}
    if provider in GPU_PROVIDERS:
        options["device_id"] = device_id
    if provider == "TensorrtExecutionProvider":
        for k, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            options[key] = ",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in profile_shapes.items())
        options.update(trt_fp16_enable=precision == "fp16", trt_engine_cache_enable=True, trt_timing_cache_enable=True,
                       trt_engine_cache_path=str(cache), trt_timing_cache_path=str(cache))  # fmt: skip
        cache.mkdir(parents=True, exist_ok=True)
    options.update(user or {})
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}


class _Session:
    """One graph's ONNX Runtime session, fed and read as torch tensors."""

    def __init__(self, session, spec, device: torch.device, precision: str, where):
        check_io(session, spec, precision, where)
        self.session, self.spec, self.device = session, spec, device
        self.input_dtypes = {i.name: _ORT_TYPES[i.type] for i in session.get_inputs()}
        self.output_dtypes = {o.name: _ORT_TYPES[o.type] for o in session.get_outputs()}
        self.provider = session.get_providers()[0]
        self.bind = device.type == "cuda" and self.provider in GPU_PROVIDERS

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = self.spec.check_inputs(inputs)
        if self.bind:
            return self._run_bound(inputs, values)
        feeds = {n: inputs[n].detach().to("cpu", self.input_dtypes[n]).contiguous().numpy() for n in self.input_dtypes}
        outputs = self.session.run(self.spec.output_names, feeds)
        return {n: torch.from_numpy(o).to(self.device) for n, o in zip(self.spec.output_names, outputs, strict=True)}

    def _run_bound(self, inputs, values) -> dict[str, torch.Tensor]:
        """IO binding: ONNX Runtime reads and writes torch's device buffers; nothing goes through the host."""
        binding = self.session.io_binding()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        keep = []  # the converted inputs must outlive the run
        for name, dtype in self.input_dtypes.items():
            x = inputs[name].detach().to(self.device, dtype).contiguous()
            keep.append(x)
            binding.bind_input(name, "cuda", index, _numpy_type(dtype), tuple(x.shape), x.data_ptr())
        outputs = {}
        for name, shape in self.spec.output_shapes(values).items():
            out = torch.empty(shape, dtype=self.output_dtypes[name], device=self.device)
            binding.bind_output(name, "cuda", index, _numpy_type(out.dtype), shape, out.data_ptr())
            outputs[name] = out
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream: inputs must be ready
        self.session.run_with_iobinding(binding)  # returns once its stream is done
        return outputs


def check_io(session, spec, precision: str, where) -> None:
    """The session's inputs and outputs against the graph's spec (names, ranks, dtypes), before its first run: a
    file swapped for another graph's (its hash updated too) is refused here, naming both sides."""
    for kind, found, wanted in (("inputs", session.get_inputs(), spec.inputs),
                                ("outputs", session.get_outputs(), spec.outputs)):  # fmt: skip
        got = {t.name: (len(t.shape), _ORT_TYPES.get(t.type, t.type)) for t in found}
        expected = {t.name: (len(t.dims), t.torch_dtype(precision)) for t in wanted}
        if got != expected:
            def listed(io):
                return ", ".join(f"{name} ({rank}-d {str(dtype).removeprefix('torch.')})" for name, (rank, dtype)
                                 in io.items())  # fmt: skip
            raise ArtifactError(f"{where} has {kind} {listed(got)}; the {spec.name} graph has {listed(expected)}: "
                                "the file of another graph?")  # fmt: skip


def _numpy_type(dtype: torch.dtype):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


ARENA_LIMIT = 1_000_000_000  # weights past which a CPU session's activations decide its memory, not its speed


class OnnxRuntimeBackend(ExportedBackend):
    adds_tokens = True  # token_table overrides the exported embedding table
    name = "onnxruntime"

    def __init__(
        self, components, device: torch.device, dtype: torch.dtype, *, artifacts, providers=None, precision=None,
        cache_dir=None, threads=None, provider_options=None,
    ):  # fmt: skip
        precision = resolve_precision(dtype, precision)
        self.providers = choose_providers(device, providers)
        if precision == "fp16" and not any(p in GPU_PROVIDERS for p in self.providers):
            log.warning("fp16 graphs on the CPU execution provider run with casts to float32 around most nodes: "
                        "slower than fp32 there")  # fmt: skip
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if provider_options is not None and not isinstance(provider_options, dict):
            raise ValueError(f"provider_options must map provider names to option dicts, got {provider_options!r}")
        self.threads = threads
        self.provider_options = {PROVIDER_ALIASES.get(k, k): v for k, v in (provider_options or {}).items()}
        self.cache_dir = resolve_cache_dir(cache_dir)
        self._overrides: dict[str, dict] = {}  # graph -> {initializer name: array} (LoRA-merged weights)
        self._at_base: dict[str, set] = {}  # graph -> overridden names whose arrays equal the file's again
        super().__init__(components, device, dtype, artifacts, precision)
        log.info("onnxruntime backend: %s graphs on %s", self.precision, " > ".join(self.providers))
        self.open_all()

    def open_runner(self, folder: Path, manifest: dict, graph: str) -> _Session:
        record = manifest["graphs"][graph]
        provider_options = [self._provider_options(p, record, manifest) for p in self.providers]
        options, keep = session_options(self.threads), []
        self._fit_memory(options, graph, record)
        overrides = self._overrides.get(graph, {})
        if overrides:
            import onnxruntime as ort

            # the layout pass of level ALL (NCHWc on the CPU) reorders convolution weights from the file's
            # initializers and ignores their overrides; every other weight is read from its override (both
            # measured with ORT 1.32). So level ALL, unless a convolution's weight is overridden: one level below,
            # without that pass, costs fashion's U-Net step about 25% (bench lora)
            if set(overrides) & self._initializer_index(graph).conv_weights:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.add_session_config_entry("session.disable_prepacking", "1")  # run from the buffers themselves
            for name, array in overrides.items():
                keep.append(ort.OrtValue.ortvalue_from_numpy(array))  # the session reads it: it must outlive it
                options.add_initializer(name, keep[-1])
        path = folder / record["onnx"]["file"]
        session = ort_session(path, self.providers, options, provider_options)
        wrapped = _Session(session, self.specs[graph], self.device, manifest["precision"], path)
        wrapped.initializers = keep
        log.info("onnxruntime: %s (%s) runs on %s", graph, manifest["precision"], wrapped.provider)
        return wrapped

    def _fit_memory(self, options, graph: str, record: dict) -> None:
        """Two memory settings of a CPU session, for graphs where memory rather than allocation time is what
        limits. A session prepacks its weights while it loads: a second copy of them at the peak (SDXL's 10 GB
        U-Net needed 20 GB). Where that copy would not fit in the memory available, the session runs from the
        weights as the file maps them, without prepacking. And a session's memory arena keeps what its runs
        allocated and grows by chunks: FLUX.1's transformer at 1024x1024 (4608 tokens) beside its torch model
        reached 24.5 GB in its second call on a 24 GB machine and was killed; 19.7 GB at most without the arena
        (bench realsize). So graphs of more than ``ARENA_LIMIT`` bytes of weights allocate from the system."""
        from ..core.memory import available_bytes

        if self.device.type != "cpu":
            return
        weights = record["onnx"]["bytes"] + (record.get("data") or {}).get("bytes", 0)
        if weights > ARENA_LIMIT:
            options.enable_cpu_mem_arena = False
        free, where = available_bytes(self.device)
        if 2 * weights > free:
            log.warning("onnxruntime: %s's %.1f GB of weights run without prepacking (a second copy of them "
                        "while loading would not fit in the %.1f GB %s)", graph, weights / 1e9, free / 1e9,
                        where)  # fmt: skip
            options.add_session_config_entry("session.disable_prepacking", "1")

    def _provider_options(self, provider: str, record: dict, manifest: dict) -> dict[str, str]:
        precision = manifest["precision"]
        cache = self.cache_dir / "ort-tensorrt" / f"{manifest['model']['hash'][:16]}-{precision}"
        user = self.provider_options.get(provider, {})
        return provider_options(provider, record["profile_shapes"], precision, self.device.index or 0, cache, user)

    def onnx_file(self, graph: str) -> Path:
        folder, manifest = self.folder(self.graph_precision(graph))
        return folder / manifest["graphs"][graph]["onnx"]["file"]

    def replace_initializers(self, graph: str, arrays: dict, restored: set) -> None:
        """Give ``graph``'s session the initializers ``arrays`` in place of the file's (no re-export; the file is
        unchanged). A CPU session reads overriding buffers where they are, so weights it already overrides are
        rewritten in place (a switch opens nothing); new ones, or a GPU session, get a new session. Once every
        override is back at the base weights, the session is the file's own again."""
        current = self._overrides.setdefault(graph, {})
        at_base = self._at_base.setdefault(graph, set())
        at_base.difference_update(arrays)
        at_base.update(restored)
        if current.keys() | arrays.keys() <= at_base:
            self._overrides[graph], self._at_base[graph] = {}, set()  # nothing adapted any more
        elif (set(arrays) <= set(current) and all(current[k].shape == a.shape for k, a in arrays.items())
              and self.runner(graph).provider == "CPUExecutionProvider"):  # fmt: skip
            import numpy as np

            for name, array in arrays.items():
                np.copyto(current[name], array)
            return
        else:
            current.update({name: array.copy() for name, array in arrays.items()})
        self._runners.pop(graph, None)
        self.runner(graph)

    def token_table(self, graph: str, base: torch.Tensor):
        """A writer for ``graph``'s token-embedding table (textual inversion adds rows): its initializer is
        found now, by the base table's content, and overridden by the grown table when the writer is called."""
        index = self._initializer_index(graph)
        name, transposed = index.locate(base, f"{graph}'s token embeddings")
        if transposed:
            raise ValueError(f"{index.path.name} stores the token embeddings transposed; it cannot grow them")

        def write(table: torch.Tensor) -> None:
            array = table.detach().to("cpu", torch.float32).numpy().astype(index.dtypes[name])
            self.replace_initializers(graph, {name: array}, set())

        return write

    def session_provider(self, graph: str) -> str:
        """The execution provider that runs ``graph`` (opening its session if needed)."""
        return self.runner(graph).provider


def create(components, device, dtype, **options) -> OnnxRuntimeBackend:
    """The backend over the model's ONNX graphs: a deployed folder's own, else exported through the cache."""
    from ..export.sources import OnnxSource

    given = {k: options.pop(k) for k in SOURCE_OPTIONS if k in options}
    source = artifact_source(components, given) or OnnxSource(components, cache_dir=options.get("cache_dir"), **given)
    return OnnxRuntimeBackend(components, device, dtype, artifacts=source, **options)
