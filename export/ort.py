"""ONNX Runtime sessions for running beside torch in one process: the export's parity checks and the
onnxruntime backend open their sessions here."""

from __future__ import annotations

from ..models.artifacts import ArtifactError


def session_options(threads: int | None = None):
    """ONNX Runtime session options for running beside torch in one process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's warnings (e.g. fp16 constant folding on the CPU) are noise here
    # ORT's idle threads otherwise spin after each run and starve torch's sampler ops between U-Net calls
    # (measured: torch 50x slower on 2 cores)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def ort_session(path, providers=("CPUExecutionProvider",), options=None, provider_options=None):
    """An ONNX Runtime session; a file that is no ONNX model is a clear error."""
    import onnxruntime as ort

    options = options or session_options()
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers), provider_options=provider_options)
    except Exception as err:  # onnxruntime raises its own exception types per failure
        raise ArtifactError(f"{path} could not be loaded as an ONNX model: {type(err).__name__}: {err}") from err
