"""The graphs as plain ``nn.Module``\\ s with positional tensor inputs and outputs, for the exporters.

Each computes exactly what the torch backend's ``run(graph)`` returns (see
:mod:`diffrt.backends.torch_backend`): the inputs are in spec order, the outputs in spec order.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .specs import TORCH_DTYPES, graph_specs


class TextEncoderGraph(nn.Module):
    def __init__(self, encoder, penultimate: bool, pooled: bool):
        super().__init__()
        self.encoder, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids=input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNetGraph(nn.Module):
    """Called with keyword inputs: SDXL adds text_embeds and time_ids, guidance-embedded LCMs timestep_cond."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
            timestep_cond=timestep_cond,
        ).sample  # fmt: skip


class VaeEncoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent).sample


def graph_module(components, name: str, precision: str | None = None) -> nn.Module:
    """The module computing graph ``name``. With ``precision`` differing from the weights' dtype it works
    on a converted copy, so the pipeline's own modules are left as they are."""
    specs = graph_specs(components)
    if name not in specs:
        raise ValueError(f"unknown graph {name!r}; this model has {list(specs)}")
    source = _source_module(components, name)
    # the TorchScript exporter writes mistyped graphs for float16 SDPA with a mask (CLIP's causal one);
    # eager attention is plain ops, with the softmax in float32
    eager = name.startswith("text_encoder") and precision not in (None, "fp32")
    if eager or (precision is not None and next(source.parameters()).dtype != TORCH_DTYPES[precision]):
        # nn.Module.to, not diffusers' override: that one warns about casting instead of reloading
        source = nn.Module.to(copy.deepcopy(source), TORCH_DTYPES[precision])
        if eager:
            source.set_attn_implementation("eager")
    if name.startswith("text_encoder"):
        pooled = len(specs[name].outputs) == 2
        return TextEncoderGraph(source, components.family == "sdxl", pooled).eval()
    if name == "unet":
        return UNetGraph(source).eval()
    return (VaeEncoderGraph if name == "vae_encoder" else VaeDecoderGraph)(source).eval()


def _source_module(components, name: str):
    if name == "text_encoder":
        return components.text_encoders[0]
    if name == "text_encoder_2":
        return components.text_encoders[1]
    return components.unet if name == "unet" else components.vae


@torch.inference_mode()
def run_module(module: nn.Module, spec, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run a graph module on named inputs; named outputs."""
    out = module(**{n: inputs[n] for n in spec.input_names})
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip(spec.output_names, out, strict=True))
