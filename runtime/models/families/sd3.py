"""Stable Diffusion 3 / 3.5 (MMDiT): ``SD3Transformer2DModel`` on 16-channel latents cut into patches.

Conditioning as diffusers' ``StableDiffusion3Pipeline`` builds it: CLIP-L and CLIP-G (penultimate hidden states
concatenated, zero-padded to T5's width) followed along the sequence by T5's states, 77 + 256 tokens by
default; the two CLIPs' projected embeddings concatenated as ``pooled_projections``. A folder without T5
(SD3 allows it) gets zero T5 states. Classifier-free guidance with the negative prompt (empty by default,
encoded as a prompt). Flow grids from the scheduler's own timesteps: a static shift (3.0 for SD3), or the
resolution shift when its config sets ``use_dynamic_shifting``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.graphspec import Dim, TensorSpec
from ..components import class_name
from .dit import TransformerFamily


class SD3TransformerGraph(nn.Module):
    """sample [B, C, h, w], timestep [B] (1000 sigma), encoder_hidden_states [B, S, D], pooled_projections
    [B, P] -> the velocity [B, C, h, w]."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections).sample  # fmt: skip

    # fbcache's pieces (diffrt.core.step_cache): forward() is finish(other_blocks(first_block(...))), block by block
    def first_block(self, sample, timestep, encoder_hidden_states, pooled_projections):
        """The image tokens before and after the first block, and what the other blocks read."""
        model = self.transformer
        hidden = model.pos_embed(sample).contiguous()
        temb = model.time_text_embed(timestep, pooled_projections)
        context, after = model.transformer_blocks[0](hidden_states=hidden, temb=temb,
                                                     encoder_hidden_states=model.context_embedder(encoder_hidden_states))
        return hidden, after, {"temb": temb, "context": context, "size": sample.shape[-2:]}

    def other_blocks(self, hidden, carry):
        context = carry["context"]
        for block in self.transformer.transformer_blocks[1:]:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=carry["temb"])
        return hidden

    def finish(self, hidden, carry):
        model, (height, width) = self.transformer, carry["size"]
        hidden = model.proj_out(model.norm_out(hidden, carry["temb"]))
        p, channels = model.config.patch_size, model.out_channels
        tiles = hidden.reshape(hidden.shape[0], height // p, width // p, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", tiles).reshape(hidden.shape[0], channels, height, width)


@dataclass(frozen=True)
class SD3Family(TransformerFamily):
    max_shift_default: float = 1.16  # StableDiffusion3Pipeline's default (FLUX's is 1.15)

    def patch_size(self) -> int:
        return self.components.transformer.config.patch_size

    def max_size(self) -> int | None:
        """Its learned position embedding is cropped to the image: at most pos_embed_max_size patches a side."""
        grid = self.components.transformer.config.get("pos_embed_max_size")
        return None if grid is None else grid * self.size_multiple()

    def check_components(self, where) -> None:
        channels, latent = self.components.transformer.config.in_channels, self.components.latent_channels
        if channels != latent:
            raise ValueError(f"{where}: the transformer takes {channels} latent channels but the VAE makes {latent}")
        if len(self.components.text_encoders) < 2:
            raise ValueError(f"{where}: SD3 needs both CLIP text encoders (text_encoder, text_encoder_2)")

    def text_outputs(self, encoder) -> tuple[bool, str | None]:
        if class_name(encoder).startswith("T5"):
            return False, None
        return True, "text_embeds"  # CLIP-L / CLIP-G with projection: penultimate states + projected pooled

    def sequence_length(self) -> int:
        return int(self.components.tokenizers[0].model_max_length) + self.t5_length()

    def denoiser_inputs(self) -> list[TensorSpec]:
        cfg = self.components.transformer.config
        b, h, w = self._latent_dims()
        return [
            TensorSpec("sample", (b, cfg.in_channels, h, w)),
            TensorSpec("timestep", (b,), "float32", 0.0, 1000.0),
            TensorSpec("encoder_hidden_states", (b, Dim("sequence"), cfg.joint_attention_dim)),
            TensorSpec("pooled_projections", (b, cfg.pooled_projection_dim)),
        ]

    def denoiser_output(self) -> TensorSpec:
        b, h, w = self._latent_dims()
        return TensorSpec("out", (b, self.components.transformer.config.out_channels, h, w))

    def denoiser_graph(self, module) -> nn.Module:
        return SD3TransformerGraph(module)

    def encode(self, run, prompts, height, width, device, max_sequence_length=None) -> dict:
        length = max_sequence_length or self.t5_length()
        clip_length = int(self.components.tokenizers[0].model_max_length)
        lengths = [(clip_length, True), (clip_length, False), (length, True)][: len(self.components.tokenizers)]
        outputs = self.run_text_encoders(run, prompts, device, lengths)
        clip = torch.cat([outputs[0]["hidden"], outputs[1]["hidden"]], dim=-1)
        pooled = torch.cat([outputs[0]["pooled"], outputs[1]["pooled"]], dim=-1)
        if len(outputs) > 2:
            t5 = outputs[2]["hidden"]
        else:  # no T5 encoder in the folder: zero states, as diffusers gives
            width_t5 = self.components.transformer.config.joint_attention_dim
            t5 = torch.zeros(len(prompts), length, width_t5, device=clip.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled_projections": pooled}


SD3 = SD3Family(
    name="sd3",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                      "StableDiffusion3InpaintPipeline"),
    save_class="StableDiffusion3Pipeline",
    text_encoder_parts=("text_encoder", "text_encoder_2", "text_encoder_3"),
    index_extras={"image_encoder": [None, None], "feature_extractor": [None, None]},
    text_encoder_classes=("CLIPTextModelWithProjection", "T5EncoderModel"),
    denoiser_classes=("SD3Transformer2DModel",),
    optional_parts=("text_encoder_3",),
)  # fmt: skip
