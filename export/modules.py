"""The graph modules the exporters trace: the family's own (the ones the torch backends run), on a converted
copy when the export precision differs from the weights' dtype."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.graphspec import TORCH_DTYPES
from ..models import families


def graph_module(components, name: str, precision: str | None = None) -> nn.Module:
    """The module computing graph ``name``. With ``precision`` differing from the weights' dtype it works
    on a converted copy, so the pipeline's own modules are left as they are."""
    model = families.model(components)
    if name not in model.graph_names():
        raise ValueError(f"unknown graph {name!r}; this model has {model.graph_names()}")
    source = model.graph_source(name)
    # the TorchScript exporter writes mistyped graphs for float16 SDPA with a mask (CLIP's causal one);
    # eager attention is plain ops, with the softmax in float32
    eager = name.startswith("text_encoder") and precision not in (None, "fp32")
    if eager or (precision is not None and next(source.parameters()).dtype != TORCH_DTYPES[precision]):
        source = converted_copy(source, TORCH_DTYPES[precision])
        if eager:
            source.set_attn_implementation("eager")
    return model.wrap_graph(name, source)


def converted_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` whose floating-point parameters and buffers are in ``dtype`` (what nn.Module.to
    converts), made tensor by tensor: deepcopy-then-convert would hold a second full-precision copy first."""
    memo = {}
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point() and id(tensor) not in memo:
            converted = tensor.detach().to(dtype)
            if isinstance(tensor, nn.Parameter):
                converted = nn.Parameter(converted, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = converted
    return copy.deepcopy(module, memo)


@torch.inference_mode()
def run_module(module: nn.Module, spec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a graph module on named inputs; named outputs."""
    out = module(**{n: inputs[n] for n in spec.input_names})
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip(spec.output_names, out, strict=True))
