"""FLUX.1 (dev, schnell): ``FluxTransformer2DModel`` on 16-channel latents packed 2x2 into tokens.

Conditioning as diffusers' ``FluxPipeline`` builds it: CLIP-L's pooled output as ``pooled_projections`` and
T5's states (512 tokens for dev, 256 for schnell by default) as the sequence, with all-zero text position
ids. The graph packs the latents and makes their position ids itself (:mod:`diffrt.models.families.flux_layout`),
so the pipeline and the samplers see ordinary ``[B, C, h, w]`` latents. Guidance: FLUX.1-dev takes its scale
as an embedding (``guidance``, one pass); ``true_cfg`` adds classifier-free guidance with a negative prompt;
models without the embedding (schnell, fashion-dit) use ``guidance`` as classifier-free guidance. Grids: the
pipeline's ``linspace(1, 1/n, n)`` sigmas with the resolution shift ``mu`` of the image's token count.

A model with one text encoder (diffrt's ``fashion-dit``, MiniLM) conditions on its states and their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...core.graphspec import Dim, TensorSpec
from ..components import class_name
from . import flux_layout
from .dit import TransformerFamily, resolution_shift


class FluxTransformerGraph(nn.Module):
    """sample [B, C, h, w], timestep [B] (1000 sigma), encoder_hidden_states [B, S, D], pooled_projections
    [B, P] (+ guidance [B] for guidance-distilled models) -> the velocity [B, C, h, w]."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, guidance=None):
        h, w = sample.shape[-2:]
        out = self.transformer(
            hidden_states=flux_layout.pack(sample), timestep=timestep / 1000, guidance=guidance,
            encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
            txt_ids=flux_layout.text_ids_like(encoder_hidden_states), img_ids=flux_layout.image_ids_like(sample),
        ).sample  # fmt: skip
        return flux_layout.unpack(out, h, w)

    # fbcache's pieces (diffrt.core.step_cache): forward() is finish(other_blocks(first_block(...))), block by block
    def first_block(self, sample, timestep, encoder_hidden_states, pooled_projections, guidance=None):
        """The image tokens before and after the first block, and what the other blocks read."""
        model = self.transformer
        hidden = model.x_embedder(flux_layout.pack(sample))
        steps = (timestep / 1000).to(hidden.dtype) * 1000  # as forward() hands it over and the model scales it
        if guidance is None:
            temb = model.time_text_embed(steps, pooled_projections)
        else:
            temb = model.time_text_embed(steps, guidance.to(hidden.dtype) * 1000, pooled_projections)
        ids = torch.cat((flux_layout.text_ids_like(encoder_hidden_states), flux_layout.image_ids_like(sample)))
        carry = {"temb": temb, "rotary": model.pos_embed(ids), "size": sample.shape[-2:]}
        context, after = self._blocks()[0](hidden_states=hidden, temb=temb, image_rotary_emb=carry["rotary"],
                                           encoder_hidden_states=model.context_embedder(encoder_hidden_states))
        return hidden, after, {**carry, "context": context}

    def other_blocks(self, hidden, carry):
        context = carry["context"]
        for block in self._blocks()[1:]:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=carry["temb"],
                                    image_rotary_emb=carry["rotary"])  # fmt: skip
        return hidden

    def finish(self, hidden, carry):
        model = self.transformer
        return flux_layout.unpack(model.proj_out(model.norm_out(hidden, carry["temb"])), *carry["size"])

    def _blocks(self) -> list:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]


@dataclass(frozen=True)
class FluxFamily(TransformerFamily):
    default_sequence: int = 512
    onnx_exporter: str = "dynamo"  # TorchScript tracing freezes token counts in diffusers' RoPE/attention code

    def lora_options(self) -> dict:
        return {"return_alphas": True}  # FluxPipeline.lora_state_dict leaves kohya alphas out unless asked

    def patch_size(self) -> int:
        return 2  # the pipeline's 2x2 packing (the transformer's own patch size is 1)

    def check_components(self, where) -> None:
        channels, latent = self.components.transformer.config.in_channels, self.components.latent_channels
        if channels != 4 * latent:
            raise ValueError(f"{where}: the transformer takes {channels} packed channels (2x2 patches of "
                             f"{channels // 4}) but the VAE makes {latent}-channel latents: not a matching FLUX VAE")
        kinds = [class_name(encoder) for encoder in self.components.text_encoders]
        if len(kinds) == 1 and kinds[0] != "BertModel":
            raise ValueError(f"{where}: a FLUX folder needs its T5 encoder (text_encoder_2) beside CLIP")  # fmt: skip

    def text_outputs(self, encoder) -> tuple[bool, str | None]:
        if class_name(encoder).startswith("CLIP"):
            return False, "pooler_output"
        return False, None  # T5, or the one MiniLM encoder of fashion-dit

    def sequence_length(self) -> int:
        if len(self.components.tokenizers) == 1:
            return int(self.components.tokenizers[0].model_max_length)
        return self.t5_length()

    def max_sequence_length(self) -> int | None:
        return None if len(self.components.tokenizers) == 1 else super().max_sequence_length()

    def guidance_distilled(self) -> bool:
        return bool(self.components.transformer.config.get("guidance_embeds"))

    def denoiser_inputs(self) -> list[TensorSpec]:
        cfg = self.components.transformer.config
        b, h, w = self._latent_dims()
        inputs = [
            TensorSpec("sample", (b, cfg.in_channels // 4, h, w)),
            TensorSpec("timestep", (b,), "float32", 0.0, 1000.0),
            TensorSpec("encoder_hidden_states", (b, Dim("sequence"), cfg.joint_attention_dim)),
            TensorSpec("pooled_projections", (b, cfg.pooled_projection_dim)),
        ]
        if self.guidance_distilled():
            inputs.append(TensorSpec("guidance", (b,), "float32", 1.0, 10.0))
        return inputs

    def denoiser_output(self) -> TensorSpec:
        cfg = self.components.transformer.config
        b, h, w = self._latent_dims()
        return TensorSpec("out", (b, (cfg.out_channels or cfg.in_channels) // 4, h, w))

    def denoiser_graph(self, module) -> nn.Module:
        return FluxTransformerGraph(module)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.components.vae_scale_factor
        return (self.components.transformer.config.in_channels // 4, height // f, width // f)

    def encode(self, run, prompts, height, width, device, max_sequence_length=None) -> dict:
        if len(self.components.tokenizers) == 1:  # fashion-dit: one encoder gives the sequence and, averaged, the pool
            hidden = self.run_text_encoders(run, prompts, device)[0]["hidden"]
            return {"encoder_hidden_states": hidden, "pooled_projections": hidden.mean(dim=1)}
        clip_length = int(self.components.tokenizers[0].model_max_length)
        lengths = [(clip_length, False), (max_sequence_length or self.t5_length(), True)]
        clip, t5 = self.run_text_encoders(run, prompts, device, lengths)
        return {"encoder_hidden_states": t5["hidden"], "pooled_projections": clip["pooled"].to(t5["hidden"].dtype)}

    def call_defaults(self, pipeline: dict) -> dict:
        """FluxPipeline hands ``guidance_scale`` only to a guidance embedding: for a model without one (schnell) it
        runs no guidance at all, which is diffrt's guidance 1 (diffrt's guidance there is classifier-free)."""
        if "guidance" in pipeline and not self.guidance_distilled():
            return {**pipeline, "guidance": 1.0}
        return pipeline

    def embedded_guidance(self, guidance, batch, like) -> dict | None:
        if not self.guidance_distilled():
            return None
        return {"guidance": torch.full((batch,), float(guidance), device=like.device, dtype=torch.float32)}

    def timestep_options(self, scheduler, steps, height, width) -> dict:
        tokens = self.image_tokens(height, width)
        options = {"mu": resolution_shift(tokens, scheduler.config, self.max_shift_default)}
        if not scheduler.config.get("use_flow_sigmas"):
            options["sigmas"] = np.linspace(1.0, 1 / steps, steps)  # FluxPipeline's, before the shift
        return options


FLUX = FluxFamily(
    name="flux",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    save_class="FluxPipeline",
    text_encoder_parts=("text_encoder", "text_encoder_2"),
    index_extras={"image_encoder": [None, None], "feature_extractor": [None, None]},
    text_encoder_classes=("CLIPTextModel", "T5EncoderModel", "BertModel"),
    denoiser_classes=("FluxTransformer2DModel",),
    optional_parts=("text_encoder_2",),  # only for one-encoder models (fashion-dit); real FLUX folders have T5
)  # fmt: skip
