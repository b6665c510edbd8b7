"""Optional packages, checked before the work that needs them: a missing one is one clear error naming the
feature and the pip extra that installs it, not a ``ModuleNotFoundError`` after the model has loaded."""

from __future__ import annotations

import importlib.util
import sys

# module -> the pyproject extra that installs it (`pip install 'diffrt[extra]'`), or the pip package
EXTRAS = {
    "onnx": "diffrt[onnx]",
    "onnxruntime": "diffrt[onnx]",
    "onnxscript": "diffrt[onnx]",
    "matplotlib": "diffrt[report]",
    "scipy": "diffrt[bench]",
    "psutil": "diffrt[bench]",
    "triton": "diffrt[gpu]",
    "tensorrt": "diffrt[gpu]",
    "torch_fidelity": "torch-fidelity",
    "peft": "diffrt[lora]",
    "cv2": "diffrt[control]",
    "ray": "diffrt[serve]",
    "fastapi": "diffrt[serve]",
    "pyarrow": "diffrt[serve]",
}


class MissingPackage(ImportError):
    """An optional package a command needs is not installed (the message says what to install)."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a ``None`` in sys.modules blocks it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(*modules: str, feature: str) -> None:
    """Raise :class:`MissingPackage` naming ``feature`` and what to pip install when a module is missing."""
    missing = [m for m in modules if not installed(m)]
    if missing:
        packages = sorted({EXTRAS.get(m, m) for m in missing})
        raise MissingPackage(f"{feature} needs {', '.join(missing)}, which is not installed: "
                             f"pip install {' '.join(repr(p) if '[' in p else p for p in packages)}")  # fmt: skip
