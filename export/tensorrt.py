"""The TensorRT API as diffrt uses it, imported only when called: the install check, precisions, refitting.
Shared by the engine builder and the tensorrt backend; ``tensorrt`` cannot be installed on a machine without an
NVIDIA GPU, so nothing here imports it at module level."""

from __future__ import annotations

from pathlib import Path

ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")
INSTALL_HINT = "pip install tensorrt (TensorRT 10 or newer; it needs an NVIDIA GPU), or pip install 'diffrt[gpu]'"


def import_tensorrt():
    """The ``tensorrt`` module; a clear error naming the install when it is missing or too old."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ValueError(f"TensorRT is not installed: {INSTALL_HINT}") from err
    if int(trt.__version__.split(".")[0]) < 10:
        raise ValueError(f"TensorRT {trt.__version__} is too old: diffrt needs TensorRT >= 10 ({INSTALL_HINT})")
    return trt


def check_precision(precision: str) -> str:
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")
    return precision


def refit_engine(engine, onnx_path: Path) -> None:
    """Replace a refittable engine's weights with those of ``onnx_path`` (same architecture, other weights)."""
    trt = import_tensorrt()
    if not engine.refittable:
        raise ValueError("this engine was not built refittable: build it with refit=True")
    logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"could not refit from {onnx_path}: {errors}")
    if not refitter.refit_cuda_engine():
        raise ValueError(f"TensorRT rejected the weights of {onnx_path} (different architecture?)")
