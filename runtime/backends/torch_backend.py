"""The eager PyTorch backend: the diffusers/transformers modules themselves.

Graph inputs and outputs (the same names every backend and the ONNX export use):
  text_encoder / text_encoder_2: input_ids [B, L] int64 -> hidden [B, L, D] (+ pooled [B, P] when projected)
  unet: sample [B, C, h, w], timestep [B], encoder_hidden_states [B, L, D]
        (+ text_embeds [B, P], time_ids [B, 6] for SDXL; + timestep_cond [B, K] for guidance-embedded LCMs)
        -> out [B, C_out, h, w]
  vae_encoder: image [B, 3, H, W] in [-1, 1] -> latent [B, 4, h, w] (the posterior mean, unscaled)
  vae_decoder: latent [B, 4, h, w] (unscaled) -> image [B, 3, H, W] in about [-1, 1]
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def is_available() -> tuple[bool, str]:
    return True, ""


class TorchBackend:
    name = "torch"

    def __init__(self, components, device: torch.device, dtype: torch.dtype):
        self.components = components
        self.device, self.dtype = device, dtype
        # SDXL conditions on the penultimate hidden states of both encoders; SD 1/2 on the last.
        self.penultimate = components.family == "sdxl"
        for module in (components.unet, components.vae, *components.text_encoders):
            module.to(device)
            if module.dtype != dtype:
                module.to(dtype)
        self.vae_dtype = dtype

    def upcast_vae(self) -> None:
        """Keep the VAE in float32 from now on (fp16 VAEs overflow on some latents: black/NaN images)."""
        self.components.vae.to(torch.float32)
        self.vae_dtype = torch.float32

    @torch.inference_mode()
    def run(self, graph: str, **inputs) -> dict[str, torch.Tensor]:
        if graph in ("text_encoder", "text_encoder_2"):
            return self._text_encoder(0 if graph == "text_encoder" else 1, inputs["input_ids"])
        if graph == "unet":
            return {"out": self._unet(**inputs)}
        if graph == "vae_decoder":
            return {"image": self._decode(inputs["latent"].to(self.vae_dtype))}
        if graph == "vae_encoder":
            image = inputs["image"].to(self.vae_dtype)
            return {"latent": self.components.vae.encode(image).latent_dist.mean}
        raise ValueError(f"unknown graph {graph!r}")

    def _text_encoder(self, index: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        encoder = self.components.text_encoders[index]
        out = encoder(input_ids=input_ids.to(self.device), output_hidden_states=self.penultimate)
        result = {"hidden": out.hidden_states[-2] if self.penultimate else out.last_hidden_state}
        if getattr(out, "text_embeds", None) is not None:
            result["pooled"] = out.text_embeds
        return result

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.components.vae.decode(latent).sample

    def _unet_module(self):
        return self.components.unet

    def _unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
        return self._unet_module()(
            sample.to(self.dtype),
            timestep,
            encoder_hidden_states=encoder_hidden_states.to(self.dtype),
            added_cond_kwargs=added,
            timestep_cond=None if timestep_cond is None else timestep_cond.to(self.dtype),
        ).sample


def create(components, device, dtype, **options) -> TorchBackend:
    if options:
        raise ValueError(f"option(s) {sorted(options)} do not apply to the torch backend")
    return TorchBackend(components, device, dtype)
