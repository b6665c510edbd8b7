"""The ONNX Runtime backend: the pipeline's graphs exported to ONNX and run in ONNX Runtime sessions.

Graph inputs and outputs are the torch backend's (the export specs in :mod:`diffrt.export.specs`), so the
Pipeline is unchanged. The graphs come from the export cache (exported on first use) or from a folder
``export_onnx`` wrote (``onnx_dir=``); their hashes are checked before a session loads them.

Providers: the TensorRT, CUDA and CPU execution providers, in that order, from those installed (CPU only
for device "cpu"), or the list given as ``providers=``; ``provider_options={"cuda": {...}}`` adds or
overrides ONNX Runtime provider options. On CUDA the inputs and outputs are bound to torch's device
buffers (IO binding), so latents never leave the GPU.

Options (``diffrt.load(..., backend="onnxruntime", **options)``): providers, provider_options, precision
("fp32"/"fp16"; default from dtype), cache_dir, onnx_dir, opset, exporter, threads.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

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
_OPTIONS = ("providers", "precision", "cache_dir", "onnx_dir", "opset", "exporter", "threads", "provider_options")


def is_available() -> tuple[bool, str]:
    for module in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(module) is None:
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

    def __init__(self, session, spec, device: torch.device):
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


def _numpy_type(dtype: torch.dtype):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, components, device: torch.device, dtype: torch.dtype, *, providers=None, precision=None,
        cache_dir=None, onnx_dir=None, opset=None, exporter="torchscript", threads=None, provider_options=None,
    ):  # fmt: skip
        from ..export import artifacts, graph_specs

        self.components, self.device, self.dtype = components, device, dtype
        self.precision = resolve_precision(dtype, precision)
        self.providers = choose_providers(device, providers)
        if self.precision == "fp16" and not any(p in GPU_PROVIDERS for p in self.providers):
            log.warning("fp16 graphs on the CPU execution provider run with casts to float32 around most nodes: "
                        "slower than fp32 there")  # fmt: skip
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if provider_options is not None and not isinstance(provider_options, dict):
            raise ValueError(f"provider_options must map provider names to option dicts, got {provider_options!r}")
        self.threads = threads
        self.provider_options = {PROVIDER_ALIASES.get(k, k): v for k, v in (provider_options or {}).items()}
        self.cache_dir = artifacts.resolve_cache_dir(cache_dir)
        self.onnx_dir = None if onnx_dir is None else Path(onnx_dir)
        self.opset, self.exporter = opset, exporter
        self.specs = graph_specs(components)
        self.model_hash = artifacts.model_hash(components)
        self.vae_precision = self.precision
        self._sessions: dict[str, _Session] = {}
        self._folders: dict[str, tuple[Path, dict]] = {}
        self._graphs(self.precision, list(self.specs))  # export or verify now, so errors come at load time
        log.info("onnxruntime backend: %s graphs on %s", self.precision, " > ".join(self.providers))
        for graph in self.specs:
            if graph != "vae_encoder":  # (image-to-image only: opened on first use)
                self._session(graph)

    def _graphs(self, precision: str, graphs: list[str]) -> tuple[Path, dict]:
        """The folder holding ``graphs`` at ``precision``: the given onnx_dir, else the cache (exporting)."""
        from ..export import ensure_onnx, open_export

        if self.onnx_dir is not None and precision == self.precision:
            manifest = open_export(self.onnx_dir, self.components, graphs, model_hash=self.model_hash)
            if manifest["precision"] != precision:
                raise ValueError(
                    f"{self.onnx_dir} holds {manifest['precision']} graphs but precision {precision!r} was asked for"
                )
            self._folders[precision] = (self.onnx_dir, manifest)
        else:  # the cache; also the fp32 VAE of an fp16 onnx_dir
            self._folders[precision] = ensure_onnx(
                self.components, precision=precision, opset=self.opset, exporter=self.exporter, graphs=graphs,
                cache_dir=self.cache_dir, model_hash=self.model_hash,
            )  # fmt: skip
        return self._folders[precision]

    def _session(self, graph: str) -> _Session:
        if graph not in self._sessions:
            precision = self.vae_precision if graph.startswith("vae") else self.precision
            folder, manifest = self._folders[precision]
            self._sessions[graph] = self._open_session(folder, manifest, graph)
        return self._sessions[graph]

    def _open_session(self, folder: Path, manifest: dict, graph: str) -> _Session:
        from ..export.onnx_export import ort_session, session_options

        options = session_options(self.threads)
        record = manifest["graphs"][graph]
        provider_options = [self._provider_options(p, record, manifest["precision"]) for p in self.providers]
        session = ort_session(folder / record["onnx"]["file"], self.providers, options, provider_options)
        wrapped = _Session(session, self.specs[graph], self.device)
        log.info("onnxruntime: %s (%s) runs on %s", graph, manifest["precision"], wrapped.provider)
        return wrapped

    def _provider_options(self, provider: str, record: dict, precision: str) -> dict[str, str]:
        cache = self.cache_dir / "ort-tensorrt" / f"{self.model_hash[:16]}-{precision}"
        user = self.provider_options.get(provider, {})
        return provider_options(provider, record["profile_shapes"], precision, self.device.index or 0, cache, user)

    def session_provider(self, graph: str) -> str:
        """The execution provider that runs ``graph`` (opening its session if needed)."""
        return self._session(graph).provider

    def run(self, graph: str, **inputs) -> dict[str, torch.Tensor]:
        if graph not in self.specs:
            raise ValueError(f"unknown graph {graph!r}; this model has {list(self.specs)}")
        return self._session(graph).run(inputs)

    def upcast_vae(self) -> None:
        """Run the VAE from its float32 export from now on (fp16 VAEs overflow on some latents)."""
        if self.vae_precision == "fp32":
            return
        self._graphs("fp32", ["vae_encoder", "vae_decoder"])
        self.vae_precision = "fp32"
        for graph in ("vae_encoder", "vae_decoder"):
            self._sessions.pop(graph, None)


def create(components, device, dtype, **options) -> OnnxRuntimeBackend:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to the onnxruntime backend; allowed: {', '.join(_OPTIONS)}")
    return OnnxRuntimeBackend(components, device, dtype, **options)
