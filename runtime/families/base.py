"""What the U-Net families share: their graphs (spec + the torch module computing it), conditioning from
CLIP-style text encoders, latent shapes and the diffusers folder layout.

A family's graph module is the one module every torch-based backend (torch, compile, triton) runs and the
ONNX exporter traces, so there is one definition of each graph. Graph modules take the spec's input names as
keywords and return the spec's outputs in order (a tensor, or a tuple for several).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..graphspec import Dim, GraphSpec, TensorSpec
from ..text import tokenize

VAE_GRAPHS = ("vae_encoder", "vae_decoder")


class TextEncoderGraph(nn.Module):
    """input_ids [B, L] -> hidden [B, L, D] (the last or the penultimate layer's), + pooled [B, P] when projected."""

    def __init__(self, encoder, penultimate: bool, pooled: bool):
        super().__init__()
        self.encoder, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids=input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNetGraph(nn.Module):
    """sample, timestep, encoder_hidden_states (+ text_embeds and time_ids for SDXL, + timestep_cond for
    guidance-embedded LCMs) -> the U-Net's output."""

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
    """image [B, 3, H, W] in [-1, 1] -> latent [B, C, h, w]: the posterior mean, unscaled."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean


class VaeDecoderGraph(nn.Module):
    """latent [B, C, h, w] (unscaled) -> image [B, 3, H, W] in about [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent).sample


@dataclass(frozen=True)
class UNetFamily:
    """A latent-diffusion family with a ``UNet2DConditionModel``, an ``AutoencoderKL`` and CLIP-style text
    encoders whose hidden states are concatenated along the feature axis. Subclasses add their conditioning."""

    name: str
    pipeline_classes: tuple[str, ...]  # model_index.json _class_name values this family loads
    save_class: str  # the pipeline class a saved folder names (diffusers' own pipelines then load it)
    text_encoder_parts: tuple[str, ...]  # folder names of the text encoders, in conditioning order
    index_extras: dict  # other model_index.json entries that pipeline class expects
    penultimate_hidden: bool = False  # condition on the penultimate layer's hidden states (SDXL)
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel", "CLIPTextModelWithProjection", "BertModel")

    # ------------------------------------------------------------------------------------------ graphs
    def text_graphs(self, components) -> list[str]:
        return ["text_encoder" if k == 0 else f"text_encoder_{k + 1}" for k in range(len(components.text_encoders))]

    def graph_names(self, components) -> list[str]:
        return [*self.text_graphs(components), "unet", *VAE_GRAPHS]

    def graph_specs(self, components) -> dict[str, GraphSpec]:
        specs = {name: _text_encoder_spec(name, encoder)
                 for name, encoder in zip(self.text_graphs(components), components.text_encoders, strict=True)}
        specs["unet"] = GraphSpec("unet", tuple(self.unet_inputs(components)), (self._unet_output(components),),
                                  multiples=dict.fromkeys(("height", "width"), self.size_multiple(components)))
        specs.update(_vae_specs(components))
        return specs  # fmt: skip

    def unet_inputs(self, components) -> list[TensorSpec]:
        cfg = components.unet.config
        b, h, w = self._latent_dims(components)
        inputs = [
            TensorSpec("sample", (b, cfg.in_channels, h, w)),
            TensorSpec("timestep", (b,), "float32", 0.0, 1000.0),
            TensorSpec("encoder_hidden_states", (b, Dim("sequence"), cfg.cross_attention_dim)),
        ]
        if components.guidance_embedding_dim:
            inputs.append(TensorSpec("timestep_cond", (b, components.guidance_embedding_dim)))
        return inputs

    def _unet_output(self, components) -> TensorSpec:
        b, h, w = self._latent_dims(components)
        return TensorSpec("out", (b, components.unet.config.out_channels, h, w))

    def _latent_dims(self, components):
        f = components.vae_scale_factor
        return Dim("batch"), Dim("height", f), Dim("width", f)

    def graph_source(self, components, name: str) -> nn.Module:
        """The diffusers/transformers module behind graph ``name``."""
        if name in VAE_GRAPHS:
            return components.vae
        if name == "unet":
            return components.unet
        return components.text_encoders[self.text_graphs(components).index(name)]

    def wrap_graph(self, components, name: str, module: nn.Module) -> nn.Module:
        """The graph module of ``name`` around ``module`` (its source, or a converted copy of it)."""
        if name == "unet":
            return UNetGraph(module).eval()
        if name in VAE_GRAPHS:
            return (VaeEncoderGraph if name == "vae_encoder" else VaeDecoderGraph)(module).eval()
        pooled = type(module).__name__.endswith("WithProjection")
        return TextEncoderGraph(module, self.penultimate_hidden, pooled).eval()

    def graph_module(self, components, name: str) -> nn.Module:
        if name not in self.graph_names(components):
            raise ValueError(f"unknown graph {name!r}; this model has {self.graph_names(components)}")
        return self.wrap_graph(components, name, self.graph_source(components, name))

    # ------------------------------------------------------------------------------------------ sizes
    def size_multiple(self, components) -> int:
        """Image sizes the U-Net runs at: the VAE factor times 2 per U-Net down block but the last (diffusers
        pads other sizes with Python control flow that a traced graph would freeze)."""
        return components.vae_scale_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)

    def default_size(self, components) -> int:
        return components.unet.config.sample_size * components.vae_scale_factor

    def latent_shape(self, components, height: int, width: int) -> tuple[int, ...]:
        f = components.vae_scale_factor
        return (components.latent_channels, height // f, width // f)

    def sequence_length(self, components) -> int:
        return int(components.tokenizers[0].model_max_length)

    # ------------------------------------------------------------------------------------ conditioning
    def run_text_encoders(self, run, components, prompts: list[str], device) -> list[dict]:
        """Each text encoder's outputs for ``prompts``; ``run(graph, **inputs)`` runs a graph."""
        graphs = zip(self.text_graphs(components), components.tokenizers, strict=True)
        return [run(graph, input_ids=tokenize(tokenizer, prompts, warn=k == 0).to(device))
                for k, (graph, tokenizer) in enumerate(graphs)]  # fmt: skip

    def encode(self, run, components, prompts: list[str], height: int, width: int, device) -> dict:
        """The U-Net's conditioning inputs for ``prompts``."""
        outputs = self.run_text_encoders(run, components, prompts, device)
        return {"encoder_hidden_states": torch.cat([out["hidden"] for out in outputs], dim=-1)}  # fmt: skip

    def unconditional(self, run, components, negatives: list[str] | None, cond: dict, height: int, width: int,
                      device) -> dict:  # fmt: skip
        """The unconditional branch of classifier-free guidance: the negative prompts, else empty ones."""
        n = cond["encoder_hidden_states"].shape[0]
        return self.encode(run, components, negatives or [""] * n, height, width, device)


def _text_encoder_spec(name: str, encoder) -> GraphSpec:
    cfg = encoder.config
    outputs = [TensorSpec("hidden", (Dim("batch"), Dim("sequence"), cfg.hidden_size))]
    if type(encoder).__name__.endswith("WithProjection"):
        outputs.append(TensorSpec("pooled", (Dim("batch"), cfg.projection_dim)))
    return GraphSpec(
        name,
        (TensorSpec("input_ids", (Dim("batch"), Dim("sequence")), "int64", 0, cfg.vocab_size),),
        tuple(outputs),
        limits={"sequence": (1, cfg.max_position_embeddings)},
    )


def _vae_specs(components) -> dict[str, GraphSpec]:
    cfg = components.vae.config
    f = components.vae_scale_factor
    b = Dim("batch")
    image = TensorSpec("image", (b, cfg.in_channels, Dim("height"), Dim("width")), "float", -1.0, 1.0)
    latent = TensorSpec("latent", (b, cfg.latent_channels, Dim("height", f), Dim("width", f)))
    decoded = TensorSpec("image", (b, cfg.out_channels, Dim("height"), Dim("width")))
    multiples = {"height": f, "width": f}
    return {
        "vae_encoder": GraphSpec("vae_encoder", (image,), (latent,), multiples=multiples),
        "vae_decoder": GraphSpec("vae_decoder", (latent,), (decoded,), multiples=multiples),
    }
