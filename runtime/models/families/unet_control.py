"""ControlNet for the U-Net families (SD 1.x/2.x, SDXL): the graph of one diffusers ``ControlNetModel`` (its
residuals, unscaled), the U-Net graph that adds the summed residuals, their names and shapes, and the check
that a ControlNet fits a U-Net.

A ControlNet copies the U-Net's down path: it returns one residual per skip feature of the U-Net (the input
convolution, each down-block layer, each downsampler) and one for the mid block, which the U-Net adds to its
own. Scaling (``controlnet_scale``, guess mode's ramp) and summing several ControlNets happen outside these
graphs (:mod:`diffrt.models.control`), so one exported or compiled graph serves every scale.
"""

from __future__ import annotations

from torch import nn

from ...core.graphspec import Dim, TensorSpec

MID = "mid_res"
CLASSES = ("ControlNetModel",)
GRAPH_PREFIX = "controlnet_"  # ControlNet k's graph is controlnet_k


def graph_name(index: int) -> str:
    return f"{GRAPH_PREFIX}{index}"


def is_graph(name: str) -> bool:
    """Whether graph ``name`` is a ControlNet's (it runs at the denoiser's batch and inputs)."""
    return name.startswith(GRAPH_PREFIX)


def down_names(unet_config) -> list[str]:
    return [f"down_res_{k}" for k in range(len(_down_levels(unet_config)))]


def _layers(config, block: int) -> int:
    layers = config.layers_per_block
    return layers if isinstance(layers, int) else layers[block]


def _down_levels(config) -> list[tuple[int, int]]:
    """(channels, resolution level) of each down residual: level 0 is the latents' size, each downsampler halves
    it. In the U-Net's order: its input convolution, then per block its layers and its downsampler."""
    channels = list(config.block_out_channels)
    levels = [(channels[0], 0)]
    for block, width in enumerate(channels):
        levels += [(width, block)] * _layers(config, block)
        if block < len(channels) - 1:
            levels.append((width, block + 1))
    return levels


def residual_specs(unet_config, batch: Dim, vae_factor: int) -> list[TensorSpec]:
    """The residuals as graph tensors (a ControlNet's outputs, the controlled U-Net's extra inputs)."""

    def dims(width: int, level: int) -> tuple:
        if level == 0:
            return batch, width, Dim("height", vae_factor), Dim("width", vae_factor)
        divisor = vae_factor * 2**level
        return (batch, width, Dim("height", divisor, f"latent_height_{2**level}"),
                Dim("width", divisor, f"latent_width_{2**level}"))  # fmt: skip

    mid_level = len(unet_config.block_out_channels) - 1
    specs = [TensorSpec(name, dims(*where)) for name, where in zip(down_names(unet_config), _down_levels(unet_config),
                                                                    strict=True)]  # fmt: skip
    return [*specs, TensorSpec(MID, dims(unet_config.block_out_channels[-1], mid_level))]


def check(controlnet, unet, latent_channels: int, vae_factor: int, where) -> None:
    """A clear error when ``controlnet`` cannot feed ``unet``: another base model (SD against SDXL: their text
    widths and added conditioning differ), another down path, or a conditioning image at another scale."""
    ours, theirs = controlnet.config, unet.config
    if ours.get("in_channels") != latent_channels:  # a 9-channel inpainting U-Net's ControlNet still takes latents
        raise ValueError(f"{where} takes {ours.get('in_channels')}-channel samples; this model's latents have "
                         f"{latent_channels} channels")  # fmt: skip
    if ours.get("global_pool_conditions"):
        raise ValueError(f"{where}: ControlNets with global_pool_conditions (shuffle) are not supported")
    for key, hint in (("cross_attention_dim", " (an SD ControlNet on SDXL, or the other way round?)"),
                      ("addition_embed_type", " (SDXL ControlNets take its pooled text and size conditioning)"),
                      ("block_out_channels", ""), ("layers_per_block", "")):  # fmt: skip
        mine, base = _as_list(ours.get(key)), _as_list(theirs.get(key))
        if mine != base:
            raise ValueError(f"{where} was made for another base model: its {key} is {mine} where this U-Net's "
                             f"is {base}{hint}")  # fmt: skip
    embedding = ours.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    factor = 2 ** (len(embedding) - 1)
    if factor != vae_factor:
        raise ValueError(f"{where}: its conditioning embedding downsamples the control image {factor}x, but this "
                         f"model's latents are {vae_factor}x smaller than its images")  # fmt: skip


def _as_list(value):
    return list(value) if isinstance(value, list | tuple) else value


def added(text_embeds, time_ids) -> dict | None:
    """SDXL's added conditioning as diffusers' U-Net and ControlNet take it (None for the other U-Nets)."""
    return None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}


class ControlNetGraph(nn.Module):
    """sample, timestep, encoder_hidden_states, controlnet_cond (the control image [B, 3, H, W] in [0, 1]) (+
    SDXL's text_embeds and time_ids) -> the residuals at scale 1, as diffusers' ControlNetModel makes them."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds=None, time_ids=None):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=1.0, guess_mode=False,
                                    added_cond_kwargs=added(text_embeds, time_ids), return_dict=False)  # fmt: skip
        return (*down, mid)


def controlnet_inputs(controlnet, unet_inputs: list[TensorSpec], batch: Dim) -> list[TensorSpec]:
    """A ControlNet's graph inputs: the U-Net's (but an LCM's guidance embedding, which diffusers' ControlNet
    pipelines do not give it) with the control image after the text. The sample has the latents' channels
    (a 9-channel inpainting U-Net's ControlNet sees the latents alone)."""
    kept = [t for t in unet_inputs if t.name != "timestep_cond"]
    sample = TensorSpec("sample", (batch, controlnet.config.in_channels, *kept[0].dims[2:]))
    channels = controlnet.config.get("conditioning_channels", 3)
    image = TensorSpec("controlnet_cond", (batch, channels, Dim("height"), Dim("width")), "float", 0.0, 1.0)
    return [sample, *kept[1:3], image, *kept[3:]]
