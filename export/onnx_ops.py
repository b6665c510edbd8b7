"""ONNX translations the TorchScript exporter lacks, registered for the time of one export.

``aten::rms_norm`` (``torch.nn.RMSNorm``: FLUX.1's and SD3.5's q/k norms) has no TorchScript symbolic before
ONNX's own RMSNormalization (opset 23, which ONNX Runtime's CPU provider does not run everywhere yet), so it
is written out: ``x / sqrt(mean(x^2) + eps) * weight`` with the statistics in float32, as diffusers' own
RMSNorm computes them.
"""

from __future__ import annotations

import contextlib

import torch

ONNX_FLOAT = 1  # TensorProto.FLOAT


def _rms_norm(g, x, normalized_shape, weight, eps):
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    eps_value = symbolic_helper._maybe_get_const(eps, "f")
    if eps_value is None or symbolic_helper._is_none(eps):
        eps_value = torch.finfo(torch.float32).eps
    axes = [-(k + 1) for k in range(len(dims))]
    x32 = g.op("Cast", x, to_i=ONNX_FLOAT)
    mean_square = g.op("ReduceMean", g.op("Mul", x32, x32), axes_i=axes, keepdims_i=1)  # axes an attribute until 18
    denominator = g.op("Sqrt", g.op("Add", mean_square, g.op("Constant", value_t=torch.tensor(eps_value))))
    normed = g.op("CastLike", g.op("Div", x32, denominator), x)
    if symbolic_helper._is_none(weight):
        return normed
    return g.op("Mul", normed, weight)


@contextlib.contextmanager
def torchscript_symbolics(opset: int):
    """The translations above, registered for ``opset`` while the block runs, removed after."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    register_custom_op_symbolic("aten::rms_norm", _rms_norm, opset)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::rms_norm", opset)
