"""Result files: ``{"schema": 1, "kind", "env", "settings", "metrics"}``, stamped and written atomically.

Benchmarks and trainers both write them (``diffrt bench ...``, ``train.json``), so results from different
machines and commits can be compared, and a crash mid-write never leaves a truncated file behind. torch is
imported only to stamp a result, not to import this module (the command line starts without it).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path

from .files import atomic_write_json, read_json_object

SCHEMA = 1

# distribution names to try per package (the GPU builds ship under other names)
_DISTRIBUTIONS = {
    "triton": ("triton",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
}


def package_version(*names: str) -> str | None:
    """Installed version from package metadata (the first of ``names`` found): no import, so no heavy
    initialisation or CUDA probing."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), e.g. 'AMD EPYC'; numerics of CPU kernels can differ by model."""
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
                               capture_output=True, text=True, timeout=5)  # fmt: skip
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _gpu(torch) -> dict:
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
    import torch

    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        **_gpu(torch),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: package_version(*dists) for name, dists in _DISTRIBUTIONS.items()},
        "git_commit": _git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(path, kind: str, settings: dict, metrics: dict) -> Path:
    """Write a result file atomically (a temp file in the same folder, then a rename).

    Values must be JSON-serialisable; NaN/inf are refused (not valid JSON): record missing values as None.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"schema": SCHEMA, "kind": kind, "env": environment(), "settings": settings, "metrics": metrics}
    atomic_write_json(path, record, sort_keys=False)
    return path


def read_result(path, kinds=None) -> dict:
    """A result file, checked: JSON, an object of this schema, and (with ``kinds``) of one of those kinds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} does not exist")
    record = read_json_object(path, f"a result object of schema {SCHEMA}")
    if record.get("schema") != SCHEMA:
        found = record.get("schema")
        raise ValueError(f"{path} has result schema {found!r}; this diffrt reads schema {SCHEMA}")
    if kinds is not None and record.get("kind") not in kinds:
        raise ValueError(f"{path}: results of kind {record.get('kind')!r}; expected one of {', '.join(kinds)}")
    for key in ("settings", "metrics"):
        if not isinstance(record.get(key), dict):
            raise ValueError(f"{path}: {key!r} must be a JSON object, got {type(record.get(key)).__name__}")
    return record


def require_numbers(mapping: dict, keys, where: str) -> None:
    """A ValueError naming ``where`` unless each of ``keys`` is in ``mapping`` as a finite number."""
    bad = [k for k in keys if not isinstance(mapping.get(k), int | float) or isinstance(mapping.get(k), bool)
           or not math.isfinite(mapping[k])]  # fmt: skip
    if bad:
        raise ValueError(f"{where} must hold finite numbers for {', '.join(bad)}; "
                         f"got {', '.join(f'{k}={mapping.get(k)!r}' for k in bad)}")  # fmt: skip
