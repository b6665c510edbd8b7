"""What every family shares (:class:`Family`: its graphs, spec + the torch module computing it; conditioning from
CLIP-style text encoders; latent shapes; the diffusers folder layout) and the U-Net families' own
(:class:`UNetFamily`).

A family is a frozen description (which pipeline classes it loads, its parts); bound to loaded components
(:meth:`Family.bind`, :func:`diffrt.models.families.model`) it is the loaded **model**: every method then reads
``self.components``, so callers hand over nothing but the call's own values.

A family's graph module is the one module every torch-based backend (torch, compile, triton) runs and the
ONNX exporter traces, so there is one definition of each graph. Graph modules take the spec's input names as
keywords and return the spec's outputs in order (a tensor, or a tuple for several).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...core.graphspec import Dim, GraphSpec, TensorSpec
from ...core.text import expand_added_tokens, tokenize
from ..components import class_name
from . import unet_cache, unet_control

VAE_GRAPHS = ("vae_encoder", "vae_decoder")


POOLED_OUTPUTS = ("text_embeds", "pooler_output")  # CLIP's projected embedding (SDXL, SD3), its pooled token (FLUX)


class PositionalGraph(nn.Module):
    """A graph module called with its inputs in the spec's order, handed over by name: what tracers that drop
    or rename keyword inputs (the TorchScript ONNX exporter, torch.export's ``**residuals``) are given."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module, self.names = module, list(names)

    def forward(self, *inputs):
        return self.module(**dict(zip(self.names, inputs, strict=True)))


class TextEncoderGraph(nn.Module):
    """input_ids [B, L] -> hidden [B, L, D] (the last or the penultimate layer's), + pooled [B, P] when the
    family reads one (``pooled``: the output's attribute, one of POOLED_OUTPUTS)."""

    def __init__(self, encoder, penultimate: bool, pooled: str | None):
        super().__init__()
        if pooled not in (None, *POOLED_OUTPUTS):
            raise ValueError(f"pooled must be None or one of {POOLED_OUTPUTS}, got {pooled!r}")
        self.encoder, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids=input_ids, output_hidden_states=self.penultimate)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (hidden, getattr(out, self.pooled)) if self.pooled else hidden


class UNetGraph(nn.Module):
    """sample, timestep, encoder_hidden_states (+ text_embeds and time_ids for SDXL, + timestep_cond for
    guidance-embedded LCMs) -> the U-Net's output."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=unet_control.added(text_embeds, time_ids), timestep_cond=timestep_cond,
        ).sample  # fmt: skip

    # DeepCache's two passes (diffrt.core.step_cache): the output and the deep feature; the output from a kept one
    def deep_full(self, depth, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None,
                  timestep_cond=None):  # fmt: skip
        return unet_cache.full(self.unet, depth, sample, timestep, encoder_hidden_states,
                               unet_control.added(text_embeds, time_ids), timestep_cond)  # fmt: skip

    def deep_partial(self, depth, feature, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None,
                     timestep_cond=None):  # fmt: skip
        return unet_cache.partial(self.unet, depth, feature, sample, timestep, encoder_hidden_states,
                                  unet_control.added(text_embeds, time_ids), timestep_cond)  # fmt: skip


class ControlledUNetGraph(UNetGraph):
    """The U-Net graph with the ControlNets' summed residuals as inputs (``down_res_0``, ..., ``mid_res``: see
    :mod:`diffrt.models.families.unet_control`), added to its skip features and mid block as diffusers adds them."""

    def __init__(self, unet):
        super().__init__(unet)
        self.down_names = unet_control.down_names(unet.config)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None,
                **residuals):  # fmt: skip
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=unet_control.added(text_embeds, time_ids), timestep_cond=timestep_cond,
            down_block_additional_residuals=tuple(residuals[name] for name in self.down_names),
            mid_block_additional_residual=residuals[unet_control.MID],
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
class Family:
    """A latent-diffusion family: a denoiser (``denoiser_part``), an ``AutoencoderKL`` and CLIP-style text
    encoders whose hidden states are concatenated along the feature axis. Subclasses say what their denoiser
    takes (``denoiser_inputs``/``denoiser_output``/``denoiser_graph``), its sizes and its conditioning."""

    name: str
    pipeline_classes: tuple[str, ...]  # model_index.json _class_name values this family loads
    save_class: str  # the pipeline class a saved folder names (diffusers' own pipelines then load it)
    text_encoder_parts: tuple[str, ...]  # folder names of the text encoders, in conditioning order
    index_extras: dict  # other model_index.json entries that pipeline class expects
    penultimate_hidden: bool = False  # condition on the penultimate layer's hidden states (SDXL)
    denoiser_part: str = ""  # the denoiser's folder and graph name ("unet", "transformer")
    denoiser_classes: tuple[str, ...] = ()
    optional_parts: tuple[str, ...] = ()  # text encoders a folder may leave out (SD3's T5)
    onnx_exporter: str = "torchscript"  # torch.onnx's exporter that keeps this family's graphs dynamic
    # pipeline classes whose __init__ rewrites an outdated scheduler config (steps_offset 1, clip_sample False)
    scheduler_fixing_pipelines: tuple[str, ...] = ()
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel", "CLIPTextModelWithProjection", "BertModel")
    controlnet_classes: tuple[str, ...] = ()  # the ControlNets this family runs
    components: object = field(default=None, compare=False, repr=False)  # set by bind(): the loaded model's parts

    def bind(self, components) -> Family:
        """This family bound to loaded ``components``: the model the pipeline, backends and exporters ask."""
        return replace(self, components=components)

    def lora_state_dict(self, state_dict: dict) -> tuple[dict, dict | None]:
        """A LoRA state dict in diffusers' naming and its kohya alphas (None for diffusers/PEFT files), by the
        family's own diffusers pipeline class (``lora_state_dict`` converts kohya/A1111 keys)."""
        import diffusers

        pipeline = getattr(diffusers, self.save_class)
        converted = pipeline.lora_state_dict(dict(state_dict), **self.lora_options())
        return converted if isinstance(converted, tuple) else (converted, None)

    def lora_options(self) -> dict:
        """What the family's ``lora_state_dict`` needs besides the state dict (its own pipeline's call)."""
        return {}

    def check_components(self, where) -> None:
        """A clear error for parts that load but do not fit together (checked once, at load)."""

    def check_controlnet(self, controlnet, where) -> None:
        """A clear error when ``controlnet`` cannot feed this model's denoiser."""
        if not self.controlnet_classes:
            raise ValueError(f"{where}: diffrt runs ControlNets on SD 1.x/2.x and SDXL U-Nets, not yet on "
                             f"{self.name} models")  # fmt: skip
        if class_name(controlnet) not in self.controlnet_classes:
            raise ValueError(f"{where} is a {class_name(controlnet)}; {self.name} models run "
                             f"{', '.join(self.controlnet_classes)}")  # fmt: skip
        parts = self.components
        unet_control.check(controlnet, parts.unet, parts.latent_channels, parts.vae_scale_factor, where)

    # ------------------------------------------------------------------------------------------ graphs
    def text_graphs(self) -> list[str]:
        count = len(self.components.text_encoders)
        return ["text_encoder" if k == 0 else f"text_encoder_{k + 1}" for k in range(count)]

    def control_graphs(self) -> list[str]:
        """The graph of each loaded ControlNet, in the order their images and scales are given."""
        return [unet_control.graph_name(k) for k in range(len(self.components.controlnets))]

    def graph_names(self) -> list[str]:
        return [*self.text_graphs(), self.denoiser_part, *self.control_graphs(), *VAE_GRAPHS]

    def graph_specs(self) -> dict[str, GraphSpec]:
        specs = {name: text_encoder_spec(name, encoder, self.text_outputs(encoder)[1])
                 for name, encoder in zip(self.text_graphs(), self.components.text_encoders, strict=True)}
        multiples = dict.fromkeys(("height", "width"), self.size_multiple())
        denoiser_inputs = self.denoiser_inputs()
        residuals = self._residual_specs()
        specs[self.denoiser_part] = GraphSpec(self.denoiser_part, (*denoiser_inputs, *residuals),
                                              (self.denoiser_output(),), multiples=multiples)
        batch = self._latent_dims()[0]
        for name, controlnet in zip(self.control_graphs(), self.components.controlnets, strict=True):
            inputs = unet_control.controlnet_inputs(controlnet, denoiser_inputs, batch)
            specs[name] = GraphSpec(name, tuple(inputs), tuple(residuals), multiples=multiples)
        specs.update(_vae_specs(self.components))
        return specs  # fmt: skip

    def _residual_specs(self) -> list[TensorSpec]:
        """The ControlNet residuals the U-Net graph takes (none without a ControlNet)."""
        if not self.components.controlnets:
            return []
        batch = self._latent_dims()[0]
        return unet_control.residual_specs(self.components.unet.config, batch, self.components.vae_scale_factor)

    def text_outputs(self, encoder) -> tuple[bool, str | None]:
        """What a text encoder's graph returns: (penultimate hidden states?, which pooled output or None)."""
        pooled = "text_embeds" if class_name(encoder).endswith("WithProjection") else None
        return self.penultimate_hidden, pooled

    def denoiser_inputs(self) -> list[TensorSpec]:
        """The denoiser graph's inputs, in order (without ControlNet residuals)."""
        raise NotImplementedError

    def denoiser_output(self) -> TensorSpec:
        raise NotImplementedError

    def _latent_dims(self):
        f = self.components.vae_scale_factor
        return Dim("batch"), Dim("height", f), Dim("width", f)

    def graph_source(self, name: str) -> nn.Module:
        """The diffusers/transformers module behind graph ``name``."""
        if name in VAE_GRAPHS:
            return self.components.vae
        if name == self.denoiser_part:
            return self.components.denoiser
        if name in self.control_graphs():
            return self.components.controlnets[self.control_graphs().index(name)]
        return self.components.text_encoders[self.text_graphs().index(name)]

    def wrap_graph(self, name: str, module: nn.Module) -> nn.Module:
        """The graph module of ``name`` around ``module`` (its source, or a converted copy of it)."""
        if name == self.denoiser_part:
            return self.denoiser_graph(module).eval()
        if name in self.control_graphs():
            return unet_control.ControlNetGraph(module).eval()
        if name in VAE_GRAPHS:
            return (VaeEncoderGraph if name == "vae_encoder" else VaeDecoderGraph)(module).eval()
        return TextEncoderGraph(module, *self.text_outputs(module)).eval()

    def denoiser_graph(self, module) -> nn.Module:
        """The graph module around the denoiser ``module`` (its source, or a converted copy)."""
        raise NotImplementedError

    def graph_module(self, name: str) -> nn.Module:
        if name not in self.graph_names():
            raise ValueError(f"unknown graph {name!r}; this model has {self.graph_names()}")
        return self.wrap_graph(name, self.graph_source(name))

    # ------------------------------------------------------------------------------------------ sizes
    def size_multiple(self) -> int:
        """Image sizes the denoiser runs at are multiples of this."""
        raise NotImplementedError

    def max_size(self) -> int | None:
        """The largest height or width the denoiser can run at (None: no fixed bound)."""
        return None

    def size_step(self) -> int:
        """Heights and widths are multiples of this (the VAE's factor; at least ``size_multiple`` too)."""
        return self.components.vae_scale_factor

    def default_size(self) -> int:
        """The height and width a call gets when it gives none (the model's trained size)."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.components.vae_scale_factor
        return (self.components.latent_channels, height // f, width // f)

    def sequence_length(self) -> int:
        return int(self.components.tokenizers[0].model_max_length)

    def denoiser_tokens(self, height: int, width: int) -> tuple[int, int] | None:
        """A transformer's (image, text) token counts at this size, for the memory estimate; None: a U-Net."""
        return None

    def max_sequence_length(self) -> int | None:
        """The longest text sequence a call may ask for (``max_sequence_length=``); None: not settable."""
        return None

    # ------------------------------------------------------------------------------------ conditioning
    def tokenize(self, prompts: list[str], max_sequence_length: int | None = None) -> None:
        """The prompts through every tokenizer of the model, unpadded, as a check (a server runs it before a
        request joins a batch): a text a tokenizer cannot take fails here, alone, naming the prompt."""
        for tokenizer in self.components.tokenizers:
            for prompt in dict.fromkeys(prompts):
                try:
                    tokenizer([expand_added_tokens(prompt, tokenizer)], padding=False, truncation=False)
                except Exception as err:  # noqa: BLE001 - tokenizers raise TypeError, ValueError, their own errors
                    raise ValueError(f"prompt {prompt[:40]!r} cannot be tokenized by {type(tokenizer).__name__}: "
                                     f"{type(err).__name__}: {err}") from None  # fmt: skip

    def run_text_encoders(self, run, prompts: list[str], device, lengths=None) -> list[dict]:
        """Each text encoder's outputs for ``prompts``; ``run(graph, **inputs)`` runs a graph. ``lengths``:
        per encoder, the padded token count (None: its tokenizer's) and whether to warn on truncation."""
        lengths = lengths or [(None, k == 0) for k in range(len(self.components.tokenizers))]
        graphs = zip(self.text_graphs(), self.components.tokenizers, lengths, strict=True)
        return [run(graph, input_ids=tokenize(tokenizer, [expand_added_tokens(p, tokenizer) for p in prompts], length,
                                              warn=warn).to(device))
                for graph, tokenizer, (length, warn) in graphs]  # fmt: skip

    def encode(self, run, prompts: list[str], height: int, width: int, device,
               max_sequence_length: int | None = None) -> dict:  # fmt: skip
        """The denoiser's conditioning inputs for ``prompts``."""
        outputs = self.run_text_encoders(run, prompts, device)
        return {"encoder_hidden_states": torch.cat([out["hidden"] for out in outputs], dim=-1)}  # fmt: skip

    def unconditional(self, run, negatives: list[str] | None, cond: dict, height: int, width: int,
                      device, max_sequence_length: int | None = None) -> dict:  # fmt: skip
        """The unconditional branch of classifier-free guidance: the negative prompts, else empty ones."""
        n = cond["encoder_hidden_states"].shape[0]
        return self.encode(run, negatives or [""] * n, height, width, device, max_sequence_length)

    def guidance_distilled(self) -> bool:
        """Whether the model takes its guidance scale as an input (see ``embedded_guidance``)."""
        return bool(self.components.guidance_embedding_dim)

    def embedded_guidance(self, guidance: float, batch: int, like: torch.Tensor) -> dict | None:
        """Inputs that give a guidance-distilled model its scale (one pass, no classifier-free guidance), or
        None when the model has none. Here: the sinusoidal ``timestep_cond`` of guidance-embedded LCM U-Nets."""
        dim = self.components.guidance_embedding_dim
        if not dim:
            return None
        return {"timestep_cond": guidance_embedding(guidance, dim, like).expand(batch, -1)}

    # ---------------------------------------------------------------------------------------- sampling
    def call_defaults(self, pipeline: dict) -> dict:
        """The defaults a folder's diffusers pipeline class gives (``pipeline``: steps, guidance, ...) in diffrt's
        terms for this model: what diffrt must use to sample as that pipeline does."""
        return pipeline

    def timestep_options(self, scheduler, steps: int, height: int, width: int) -> dict:
        """Keywords the family's pipeline gives ``scheduler.set_timesteps`` beyond the step count (FLUX's
        custom sigmas, the resolution shift ``mu``); the U-Net families give none."""
        return {}

    def uses_scheduler_grid(self) -> bool:
        """Whether the model samples on its scheduler's own timesteps (through ``from_diffusers``) rather than
        on diffrt's grid builders: consistency models, and the transformer families' shifted flow grids."""
        return self.components.is_consistency

    def check_cache(self, config) -> None:
        """A clear error when this model cannot run the step cache ``config`` (:mod:`diffrt.core.step_cache`)."""
        raise NotImplementedError

@dataclass(frozen=True)
class UNetFamily(Family):
    """A family with a ``UNet2DConditionModel`` denoiser (SD 1.x/2.x, SDXL, the embedded U-Net models), which
    takes ControlNets and DeepCache."""

    denoiser_part: str = "unet"
    denoiser_classes: tuple[str, ...] = ("UNet2DConditionModel",)
    controlnet_classes: tuple[str, ...] = unet_control.CLASSES

    def denoiser_inputs(self) -> list[TensorSpec]:
        cfg = self.components.unet.config
        b, h, w = self._latent_dims()
        inputs = [
            TensorSpec("sample", (b, cfg.in_channels, h, w)),
            TensorSpec("timestep", (b,), "float32", 0.0, 1000.0),
            TensorSpec("encoder_hidden_states", (b, Dim("sequence"), cfg.cross_attention_dim)),
        ]
        if self.components.guidance_embedding_dim:
            inputs.append(TensorSpec("timestep_cond", (b, self.components.guidance_embedding_dim)))
        return inputs

    def denoiser_output(self) -> TensorSpec:
        b, h, w = self._latent_dims()
        return TensorSpec("out", (b, self.components.unet.config.out_channels, h, w))

    def denoiser_graph(self, module) -> nn.Module:
        return ControlledUNetGraph(module) if self.components.controlnets else UNetGraph(module)

    def size_multiple(self) -> int:
        """Image sizes the U-Net runs at: the VAE factor times 2 per U-Net down block but the last (diffusers
        pads other sizes with Python control flow that a traced graph would freeze)."""
        return self.components.vae_scale_factor * 2 ** (len(self.components.unet.config.block_out_channels) - 1)

    def default_size(self) -> int:
        return self.components.unet.config.sample_size * self.components.vae_scale_factor

    def check_cache(self, config) -> None:
        """A clear error when this model cannot run the step cache ``config`` (:mod:`diffrt.core.step_cache`)."""
        if config.kind != "deepcache":
            raise ValueError(f"cache kind {config.kind!r} is for transformers; U-Nets ({self.name}) take deepcache")
        unet_cache.check(self.components.unet, config.depth)



def guidance_embedding(guidance: float, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of (guidance - 1) * 1000, as guidance-distilled LCM U-Nets were trained with."""
    w = (guidance - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = torch.cat([torch.sin(w * freqs), torch.cos(w * freqs)])
    emb = torch.nn.functional.pad(emb, (0, dim % 2))
    return emb[None].to(device=like.device, dtype=like.dtype)


T5_MAX_SEQUENCE = 512  # T5 has relative positions: no table caps it; FLUX.1 and SD3 use at most 512 tokens


def text_encoder_spec(name: str, encoder, pooled: str | None) -> GraphSpec:
    cfg = encoder.config
    outputs = [TensorSpec("hidden", (Dim("batch"), Dim("sequence"), cfg.hidden_size))]
    if pooled is not None:
        width = cfg.projection_dim if pooled == "text_embeds" else cfg.hidden_size
        outputs.append(TensorSpec("pooled", (Dim("batch"), width)))
    return GraphSpec(
        name,
        (TensorSpec("input_ids", (Dim("batch"), Dim("sequence")), "int64", 0, cfg.vocab_size),),
        tuple(outputs),
        limits={"sequence": (1, getattr(cfg, "max_position_embeddings", None) or T5_MAX_SEQUENCE)},
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
