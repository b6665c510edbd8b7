"""Shared benchmark plumbing: an environment stamp and atomic JSON result files.

Every result file is ``{"schema": 1, "kind", "env", "settings", "metrics"}`` so results from different
machines and commits can be compared, and a crash mid-write never leaves a truncated file behind.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from ..export.artifacts import atomic_write_bytes

SCHEMA = 1

# distribution names to try per package (the GPU builds ship under other names)
_DISTRIBUTIONS = {
    "triton": ("triton",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
}


def _version(names: tuple[str, ...]) -> str | None:
    """Installed version from package metadata: no import, so no heavy initialisation or CUDA probing."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """HEAD of the checkout this file lives in (None outside a git checkout), '+dirty' if it has changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _gpu() -> dict:
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_sms": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cuda_driver": getattr(torch._C, "_cuda_getDriverVersion", lambda: None)(),
    }


def environment() -> dict:
    """Where and with what a result was measured."""
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        **_gpu(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _version(dists) for name, dists in _DISTRIBUTIONS.items()},
        "git_commit": _git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(path, kind: str, settings: dict, metrics: dict) -> Path:
    """Write a result file atomically: a temp file in the same directory (same filesystem), then os.replace.

    Values must be JSON-serialisable; NaN/inf are refused (not valid JSON): record missing values as None.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"schema": SCHEMA, "kind": kind, "env": environment(), "settings": settings, "metrics": metrics}
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"  # serialise first: fail before touching disk
    atomic_write_bytes(path, text.encode())
    return path


def percentiles(values) -> dict[str, float]:
    """p50, p90 (linear interpolation, as numpy's default) and min of a list of timings."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("percentiles of an empty list")

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"p50": at(0.5), "p90": at(0.9), "min": ordered[0]}


CALL_SETTINGS = ("sampler", "steps", "guidance")


def add_call_arguments(parser) -> None:
    """--sampler/--steps/--guidance; unset means the model's own defaults (its diffrt.json)."""
    parser.add_argument("--sampler", default=None, help="default: the model's")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")


def fill_call_defaults(args, pipe) -> None:
    """Replace unset sampling arguments by the pipeline's defaults, so the result file records what ran."""
    for key in CALL_SETTINGS:
        if getattr(args, key) is None:
            setattr(args, key, pipe.components.defaults[key])
