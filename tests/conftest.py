"""Shared test setup: marker skips (gpu, tensorrt, slow) and the Triton interpreter on CPU-only machines."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _import_hub_kernels() -> None:
    """Import Hugging Face's ``kernels`` package (transformers imports it) before anything else can.

    pytest puts the repository root on ``sys.path`` (for the ``tests`` package), and that root holds diffrt's
    ``kernels/`` folder (installed as ``diffrt.kernels``): without this, ``import kernels`` inside transformers
    would find diffrt's folder and fail. Subprocesses get PYTHONSAFEPATH, so ``python -m`` run from the root
    does not put it on their path either.
    """
    os.environ["PYTHONSAFEPATH"] = "1"
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != REPO_ROOT]
    try:
        if importlib.util.find_spec("kernels") is not None:
            import kernels  # noqa: F401
    finally:
        sys.path[:] = saved


_import_hub_kernels()

# Triton reads TRITON_INTERPRET when it is imported: set it before any test module imports triton.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none on this machine"))
        if "tensorrt" in item.keywords and not (has_trt and _HAS_CUDA):
            item.add_marker(pytest.mark.skip(reason="needs the tensorrt package and a CUDA GPU"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow; run with --runslow"))
