"""Shared test setup: the test tiers, marker skips (gpu, tensorrt, slow) and the Triton interpreter on CPU-only
machines.

Every test has one tier: its own marker, else its module's in ``MODULE_TIERS``, else ``unit``.
``python -m pytest -q -m unit`` is the inner loop (under 2 minutes on 2 cores); ``python -m pytest -q`` runs
every tier, as CI does. ``slow`` comes on top of a tier (skipped without ``--runslow``).
"""

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


TIERS = ("unit", "integration", "gates", "serve")
MODULE_TIERS = {  # paths under tests/; a folder ends with "/"
    # integration: real models, exports, compiles, trainers, subprocesses, the Triton interpreter at size
    "export/test_onnx_export.py": "integration", "export/test_dit_export.py": "integration",
    "export/test_cache.py": "integration", "export/test_deployment.py": "integration",
    "export/test_onnxruntime_backend.py": "integration", "export/test_cli_export.py": "integration",
    "pipeline/test_folder_fidelity.py": "integration", "pipeline/test_memory.py": "integration",
    "pipeline/test_aot_packages.py": "integration", "pipeline/test_triton_backend.py": "integration",
    "pipeline/test_compile_backend.py": "integration", "pipeline/test_controlnet.py": "integration",
    "pipeline/test_lora.py": "integration", "pipeline/test_noise.py": "integration",
    "embedded/": "integration", "train/test_cli_train.py": "integration", "train/test_trainers.py": "integration",
    "train/test_ship.py": "integration",
    "kernels/test_dit_kernels.py": "integration", "kernels/test_dit_patch.py": "integration",
    "kernels/test_group_norm.py": "integration", "kernels/test_compile_gpu.py": "integration",
    "bench/test_gpu_suite.py": "integration", "bench/test_realsize.py": "integration",
    "bench/test_bench_controlnet.py": "integration", "bench/test_coldstart.py": "integration",
    # gates: the FID/KID quality gates
    "bench/test_fid_gate.py": "gates",
    # serve: a Ray cluster, servers on 127.0.0.1, Chromium
    "serve/test_server.py": "serve", "serve/test_batch.py": "serve", "serve/test_hardening.py": "serve",
}  # fmt: skip


def tier_of(path: Path) -> str:
    """The tier of the tests in ``path`` that carry no tier marker of their own."""
    relative = path.resolve().relative_to(REPO_ROOT / "tests").as_posix()
    return MODULE_TIERS.get(relative) or MODULE_TIERS.get(relative.split("/")[0] + "/") or "unit"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(getattr(pytest.mark, tier_of(item.path)))
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none on this machine"))
        if "tensorrt" in item.keywords and not (has_trt and _HAS_CUDA):
            item.add_marker(pytest.mark.skip(reason="needs the tensorrt package and a CUDA GPU"))
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow; run with --runslow"))
