"""The torch.compile backend: the U-Net and VAE-decoder graph modules compiled by TorchInductor.

Compilation happens on the first call of each graph and again for each new input shape (``dynamic=False``
keeps the fastest static kernels; a benchmark's cold start shows the cost). ``mode`` is torch.compile's:
"default", "reduce-overhead" (CUDA graphs inside Inductor) or "max-autotune".

Compiled code is kept across processes in diffrt's cache folder (``$DIFFRT_CACHE/compile/``, or
``cache_dir=``), two ways (``persist=False`` turns both off):

- TorchInductor's own cache folder (generated code, built C++ and Triton kernels) goes to
  ``compile/inductor`` there, unless ``TORCHINDUCTOR_CACHE_DIR`` is already set (by the user, or by torch
  once this process compiled before). Inductor's default is under /tmp, which containers and reboots wipe.
- After each first compile of a graph and shape, torch's portable cache artifacts
  (``torch.compiler.save_cache_artifacts``: FX-graph and AOTAutograd entries, Triton kernel bundles on CUDA)
  are saved under a key of the model's architecture (not its weights: Inductor takes them as inputs), the
  mode, torch's version and the device, and loaded by the next process before its first call. They carry
  over to a machine with an empty Inductor cache; on the CPU they hold no built C++ kernels, which that
  machine then builds again.

A warm process still traces the model with dynamo (seconds for a U-Net); torch's whole-function precompile
(``aot_compile``) would skip that, but refuses diffusers' U-Net ("ID_MATCH guard cannot be serialized",
torch 2.13). ``aot=True`` skips it another way: the graphs are exported and compiled ahead of time by
AOTInductor into packages in the same cache folder, which a later process loads (:mod:`.aot`); they take
the sizes torch.export found, so ``dynamic`` does not apply to them. The step cache's partial passes are
still compiled by torch.compile.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.files import atomic_write_bytes
from ..models.artifacts import architecture, key_hash, resolve_cache_dir, safe_name
from .aot import AotGraph, inductor_configs
from .torch_backend import TorchBackend

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIONS = ("mode", "dynamic", "cache_dir", "persist", "aot")

log = logging.getLogger(__name__)


def is_available() -> tuple[bool, str]:
    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0)"
    return True, ""


class CompileBackend(TorchBackend):
    name = "compile"

    def __init__(self, components, device, dtype, mode: str = "default", dynamic: bool = False, cache_dir=None,
                 persist: bool = True, aot: bool = False):  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
        for option, value in (("persist", persist), ("aot", aot)):
            if not isinstance(value, bool):
                raise ValueError(f"{option} must be True or False, got {value!r}")
        if aot and not persist:
            raise ValueError("aot=True keeps its compiled packages in diffrt's cache: it needs persist=True")
        if aot:
            inductor_configs(mode)  # refuses reduce-overhead before anything loads
        super().__init__(components, device, dtype)
        self.mode, self.dynamic, self.aot = mode, dynamic, aot
        self.artifact_dir = compile_cache_folder(components, device, mode, dynamic, cache_dir) if persist else None
        if persist:
            use_inductor_cache(resolve_cache_dir(cache_dir) / "compile" / "inductor")
        self.reused = load_artifacts(self.artifact_dir) if persist and not aot else 0
        # the denoiser (the family's: unet or transformer), its ControlNets and the VAE decoder
        compiled = (self.model.denoiser_part, *self.model.control_graphs(), "vae_decoder")
        self.compiled = {name: self._compile(name) for name in compiled}
        self._compiled_for: set[tuple] = set()  # (graph, dtype, first input's shape) already compiled
        self._pieces: dict[tuple[str, str], object] = {}  # step caches' passes, compiled on first use

    def _compile(self, graph: str):
        if self.aot:
            folder = self.artifact_dir / "aot"
            return AotGraph(graph, self.modules[graph], self.specs[graph], folder, self.graph_dtype(graph), self.mode)
        return torch.compile(self.modules[graph], mode=self.mode, dynamic=self.dynamic)

    def graph_module(self, graph: str):
        return self.compiled[graph] if graph in self.compiled else self.modules[graph]

    def run(self, graph: str, **inputs) -> dict[str, torch.Tensor]:
        first = graph in self.compiled and not self.aot and self._announce(graph, inputs)
        outputs = super().run(graph, **inputs)
        if first:
            self._save_artifacts(graph, inputs)
        return outputs

    def _save_artifacts(self, graph: str, inputs: dict) -> None:
        """Keep what this process compiled so far (one file per first compile: files never overwrite each other)."""
        if self.artifact_dir is None:
            return
        saved = torch.compiler.save_cache_artifacts()
        if not saved or not saved[0]:
            return
        shape = "x".join(map(str, next(iter(inputs.values())).shape))
        path = self.artifact_dir / f"{graph}-{str(self.graph_dtype(graph)).removeprefix('torch.')}-{shape}.bin"
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, saved[0])
        log.info("saved torch.compile artifacts of %s (%.1f MB) to %s", graph, len(saved[0]) / 1e6, path)

    def cache_piece(self, graph: str, piece: str):
        if (graph, piece) not in self._pieces:
            log.info("compiling the step cache's %s pass of %s with torch.compile (mode %s)", piece, graph, self.mode)
            function = super().cache_piece(graph, piece)
            self._pieces[graph, piece] = torch.compile(function, mode=self.mode, dynamic=self.dynamic)
        return self._pieces[graph, piece]

    def graph_dtype(self, graph: str) -> torch.dtype:
        return self.vae_dtype if graph == "vae_decoder" else self.dtype

    def _announce(self, graph: str, inputs: dict) -> bool:
        """Say so when a call will compile: the first call of each graph and size takes minutes, silently.
        Keyed on the first input's shape (the batch and latent size the others follow): one lookup per call.
        True on such a first call."""
        first = next(iter(inputs.values()))
        key = (graph, self.graph_dtype(graph), tuple(first.shape))
        if key in self._compiled_for:
            return False
        self._compiled_for.add(key)
        how = "reusing saved artifacts" if self.reused else "this can take minutes"
        log.info("compiling %s with torch.compile (mode %s, first call at %s; %s)",
                 graph, self.mode, "x".join(map(str, first.shape)), how)  # fmt: skip
        return True

    def upcast_vae(self) -> None:
        super().upcast_vae()
        self.compiled["vae_decoder"] = self._compile("vae_decoder")  # recompile for float32


def compile_cache_folder(components, device, mode: str, dynamic: bool, cache_dir=None) -> Path:
    """``CACHE/compile/NAME-KEY``: compiled code of one architecture, mode, torch version and device kind."""
    key = key_hash({"architecture": architecture(components), "mode": mode, "dynamic": bool(dynamic),
                    "torch": torch.__version__, "device": _device_kind(device)})  # fmt: skip
    return resolve_cache_dir(cache_dir) / "compile" / f"{safe_name(components.name)}-{key[:16]}"


def _device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return device.type


def use_inductor_cache(folder: Path) -> str:
    """Point TorchInductor's cache at ``folder`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set; the folder in use.
    (Process-wide, as torch itself sets the variable on its first compile.)"""
    import os

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current:
        log.info("TorchInductor caches in %s (TORCHINDUCTOR_CACHE_DIR)", current)
        return current
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    log.info("TorchInductor caches in %s", folder)
    return str(folder)


def load_artifacts(folder: Path) -> int:
    """Load every saved artifact file of ``folder`` into torch's caches; how many were loaded. A file torch
    cannot read (another torch build, a truncated copy) is skipped with a warning: it is only a cache."""
    loaded = 0
    for path in sorted(folder.glob("*.bin")) if folder.is_dir() else ():
        try:
            info = torch.compiler.load_cache_artifacts(path.read_bytes())  # None: torch could not read it
        except Exception as err:  # torch raises several types for a foreign or damaged blob
            info, why = None, f"{type(err).__name__}: {err}"
        else:
            why = "torch could not read it (another torch build, or damaged)"
        if info is None:
            log.warning("ignoring unreadable torch.compile artifacts %s: %s", path, why)
            continue
        loaded += 1
    if loaded:
        log.info("loaded %d saved torch.compile artifact file(s) from %s", loaded, folder)
    return loaded


def create(components, device, dtype, **options) -> CompileBackend:
    return CompileBackend(components, device, dtype, **options)
