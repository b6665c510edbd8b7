"""AOTInductor packages for the compile backend (``aot=True``): a graph exported once with ``torch.export``,
compiled ahead of time into a ``.pt2`` package in diffrt's cache, and loaded by later processes in a few
hundredths of a second, where ``torch.compile`` traces the model with dynamo again in every process (14 s
for fashion-lcm's U-Net on 2 CPU cores, warm caches).

- **No weights in the package.** A loaded package reads the graph module's own parameters and buffers as
  user-managed constants (same storage, no copy). One package serves every checkpoint of an architecture,
  and in-place writes (LoRA merges) are seen without recompiling.
- **Shapes.** The dims the graph's spec declares dynamic are exported as ``Dim.AUTO``, with torch's
  size-oblivious handling of sizes 0 and 1 where this torch has it, and a package keeps the ranges
  ``torch.export`` found. A call outside every package's ranges exports and compiles one more package from
  that call (diffusers' upsampler, for one, takes another branch from batch 64, which ends a range at 63).
  A batch-1 call exports at batch 2 first, so its package also serves larger batches when the graph allows.
- **Files.** ``GRAPH-DTYPE-SIGNATURE-RANGES.pt2`` (the signature: the graph's spec, Inductor's settings and
  the CPU's vector ISA) with a ``.json`` beside it (the ranges), both renamed into place, the JSON last: a
  package without its JSON is not used. Packages are loaded when the backend is made, as ONNX Runtime
  sessions are; one torch cannot load is skipped with a warning and compiled again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.checks import fields
from ..core.files import atomic_write_json, clean_leftovers, temp_prefix
from ..core.graphspec import Dim
from ..models.artifacts import key_hash
from ..models.families.base import PositionalGraph

log = logging.getLogger(__name__)

FORMAT = 1  # the JSON sidecar's layout


def inductor_configs(mode: str) -> dict:
    """Inductor's settings for a package compiled in torch.compile's ``mode``."""
    if mode == "reduce-overhead":
        raise ValueError("aot=True cannot use mode 'reduce-overhead' (CUDA graphs have no ahead-of-time form); "
                         "use mode 'default' or 'max-autotune', or aot=False")  # fmt: skip
    # the weights stay out of the package, all of them: Inductor would otherwise inline tensors of up to 8
    # values (biases, norm scales) into the code, and a package would carry one checkpoint's
    configs = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
    if mode.startswith("max-autotune"):
        configs["max_autotune"] = True
    return configs


@dataclass
class Package:
    """One compiled package: the sizes it accepts per input axis (an int: fixed; [low, high]: a range,
    high None when unbounded) and, once used, its loaded runner."""

    path: Path
    axes: dict[str, list]
    runner: object = None


def accepts(axes: dict[str, list], inputs: dict[str, torch.Tensor]) -> bool:
    """Whether every input's shape is within ``axes`` (a package's accepted sizes)."""
    for name, allowed in axes.items():
        shape = inputs[name].shape
        if len(shape) != len(allowed):
            return False
        for size, axis in zip(shape, allowed, strict=True):
            if isinstance(axis, int):
                if size != axis:
                    return False
            elif axis is not None and (size < axis[0] or (axis[1] is not None and size > axis[1])):
                return False
    return True


class AotGraph:
    """One graph's packages: read from ``folder`` and loaded when it is made, compiled when none covers a call.
    Called like the graph module, with its named inputs."""

    def __init__(self, graph: str, module: torch.nn.Module, spec, folder: Path, dtype: torch.dtype, mode: str):
        self.graph, self.spec, self.folder = graph, spec, Path(folder)
        # exported and run positionally: torch.export cannot mark the dims of a ``**residuals`` input by name
        self.module = PositionalGraph(module, spec.input_names)
        self.configs = inductor_configs(mode)
        # the host code is built for this CPU's vector ISA (AVX2, AVX512, ...): a shared cache keeps them apart
        signature = key_hash({"spec": spec.signature(), "configs": self.configs,
                              "cpu": torch.backends.cpu.get_cpu_capability()})[:8]  # fmt: skip
        self.prefix = f"{graph}-{str(dtype).removeprefix('torch.')}-{signature}"
        self.packages = [p for p in map(_read_package, sorted(self.folder.glob(f"{self.prefix}-*.json"))) if p]
        for package in list(self.packages):  # loaded now, as the ONNX Runtime backend opens its sessions
            self._ready(package)
        self.compiled = 0  # packages this process compiled

    def __call__(self, **inputs: torch.Tensor):
        # a package reads its inputs at the strides it was exported with (dense): an expanded timestep would
        # give every image the first one's
        inputs = {name: tensor.contiguous() for name, tensor in inputs.items()}
        package = next((p for p in self.packages if accepts(p.axes, inputs)), None)
        if package is None:
            package = self._compile(inputs)
        return package.runner(*(inputs[name] for name in self.spec.input_names))

    def _ready(self, package: Package) -> bool:
        """Load ``package`` and hand it the module's tensors; False (with a warning) when torch cannot load it."""
        if package.runner is not None:
            return True
        start = time.perf_counter()
        try:
            runner = _load_package(package.path)
            tensors = {**dict(self.module.named_parameters(remove_duplicate=False)),
                       **dict(self.module.named_buffers(remove_duplicate=False))}
            needed = runner.get_constant_fqns()
            missing = [name for name in needed if name not in tensors]
            if missing:
                raise ValueError(f"it needs constants the module does not hold: {missing[:5]}")
            runner.load_constants({name: tensors[name].detach() for name in needed}, check_full_update=True,
                                  user_managed=True)  # fmt: skip
        except Exception as err:  # torch raises many types for a foreign or damaged package
            log.warning("cannot use the compiled package %s (%s: %s); compiling it again",
                        package.path, type(err).__name__, err)  # fmt: skip
            self.packages.remove(package)
            return False
        package.runner = runner
        log.info("loaded the compiled package %s in %.3f s", package.path.name, time.perf_counter() - start)
        return True

    def _compile(self, inputs: dict[str, torch.Tensor]) -> Package:
        log.info("compiling %s ahead of time with AOTInductor at %s (this can take minutes; later processes "
                 "load it from %s)", self.graph, _describe(inputs), self.folder)  # fmt: skip
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            call = {name: tensor.clone() for name, tensor in inputs.items()}  # not inference tensors
            program, axes = None, None
            for example in (_widened(call, self.spec), call):
                program, axes = self._export(example)
                if accepts(axes, call):
                    break
            else:
                raise RuntimeError(f"torch.export of {self.graph} gave ranges {axes} that exclude this call's "
                                   f"sizes {_describe(inputs)}")  # fmt: skip
            package = self._write(program, axes)
        self.compiled += 1
        log.info("compiled %s in %.1f s: %s", self.graph, time.perf_counter() - start, package.path)
        self.packages.append(package)
        if not self._ready(package):
            raise RuntimeError(f"the package just compiled for {self.graph} does not load: {package.path}")
        return package

    def _export(self, example: dict[str, torch.Tensor]):
        """The exported program and the sizes it accepts per input axis."""
        dims = tuple({axis: torch.export.Dim.AUTO for axis, d in enumerate(t.dims) if isinstance(d, Dim)}
                     for t in self.spec.inputs)  # fmt: skip
        inputs = tuple(example[name] for name in self.spec.input_names)
        with _size_oblivious():
            program = torch.export.export(self.module, inputs, dynamic_shapes=(dims,), strict=False)
        return program, _accepted_sizes(program, self.spec.input_names)

    def _write(self, program, axes: dict[str, list]) -> Package:
        from torch._inductor import aoti_compile_and_package

        self.folder.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.folder)  # what a killed compile left
        stem = f"{self.prefix}-{key_hash(axes)[:12]}"
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=temp_prefix("compiling-")) as scratch:
            built = aoti_compile_and_package(program, package_path=str(Path(scratch) / "package.pt2"),
                                             inductor_configs=self.configs)  # fmt: skip
            os.replace(built, self.folder / f"{stem}.pt2")
        atomic_write_json(self.folder / f"{stem}.json", {"format": FORMAT, "graph": self.graph, "axes": axes,
                                                         "torch": torch.__version__})  # fmt: skip
        return Package(self.folder / f"{stem}.pt2", axes)


def _load_package(path: Path):
    """The package's runner, built as torch's own loader builds it but without ``aoti_load_package``'s device
    report: on the CPU that report probes the compiler for every vector ISA (g++ runs and dlopen probes, 0.2 to
    1.2 s in each process) only to log a mismatch; the package's name carries the CPU's capability instead.
    Where this torch lacks those classes, ``aoti_load_package`` itself."""
    try:
        from torch._inductor.package.package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader
    except (ImportError, AttributeError):
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(path))
    return AOTICompiledModel(loader(str(path), "model", False, 1, -1))


def _read_package(sidecar: Path) -> Package | None:
    try:
        record = fields(json.loads(sidecar.read_text()), {"format": int, "graph": str, "axes": dict}, str(sidecar))
        path = sidecar.with_suffix(".pt2")
        if record["format"] != FORMAT or not path.is_file():
            raise ValueError(f"format {record['format']!r} or no {path.name}")
        for name, dims in record["axes"].items():
            if not isinstance(dims, list) or not all(_is_axis(axis) for axis in dims):
                raise ValueError(f"axes[{name!r}] must be a list of sizes, [low, high] ranges or nulls")
        return Package(path, record["axes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the compiled package record %s: %s", sidecar, err)
        return None


def _is_axis(axis) -> bool:
    """An entry of a package's axes: a fixed size, a [low, high] range (high null: unbounded), or null."""
    if axis is None or (isinstance(axis, int) and not isinstance(axis, bool)):
        return True
    return (isinstance(axis, list) and len(axis) == 2 and isinstance(axis[0], int)
            and (axis[1] is None or isinstance(axis[1], int)))  # fmt: skip


def _widened(inputs: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """The inputs with every dynamic axis of size 1 doubled: an export at size 1 fixes the size to 1."""
    out = {}
    for t in spec.inputs:
        x = inputs[t.name]
        for axis, d in enumerate(t.dims):
            if isinstance(d, Dim) and x.shape[axis] == 1:
                x = torch.cat([x, x], dim=axis)
        out[t.name] = x
    return out


def _accepted_sizes(program, names: list[str]) -> dict[str, list]:
    """Per input (the program's user inputs, in ``names``' order) and axis: the fixed size, or [low, high] from
    the program's range constraints (high None when unbounded; None for an axis that is an expression of other
    sizes, which the spec's own checks cover)."""
    ranges = program.range_constraints
    user_inputs = set(program.graph_signature.user_inputs)
    values = [node.meta["val"] for node in program.graph.nodes if node.op == "placeholder" and node.name in user_inputs]
    if len(values) != len(names):
        raise RuntimeError(f"the exported program takes {len(values)} inputs, the graph {len(names)}: {names}")
    axes = {}
    for name, value in zip(names, values, strict=True):
        sizes = []
        for size in value.shape:
            if isinstance(size, int):
                sizes.append(size)
                continue
            expr = size.node.expr
            if expr not in ranges:
                sizes.append(None)
                continue
            low, high = ranges[expr].lower, ranges[expr].upper
            sizes.append([int(low) if low.is_Integer else 0, int(high) if high.is_Integer else None])
        axes[name] = sizes
    return axes


def _size_oblivious():
    """torch's size-oblivious mode for export when this torch has it: sizes 0 and 1 are then not special, so a
    package exported at batch 2 can also take batch 1."""
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(fx_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


def _describe(inputs: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, t.shape))}" for name, t in inputs.items())
