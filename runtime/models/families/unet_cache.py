"""DeepCache's two passes of a diffusers ``UNet2DConditionModel`` (see :mod:`diffrt.core.step_cache`).

The U-Net is run layer by layer: the down path makes one skip feature per step (the input convolution, each
resnet/attention layer, each downsampler) and every up-path layer takes one back, the last-made first.
``full`` is the U-Net's forward pass written out so (the same module calls in the same order: its output
equals ``unet(...)``) and also returns the feature entering the up path's last ``depth`` layers; ``partial``
recomputes only the first ``depth`` skip features and those ``depth`` up layers on a kept feature. So
``depth`` 1 recomputes the input convolution and the last up layer alone (DeepCache's shallowest branch).
diffusers has no DeepCache; this is written against the U-Net's public block attributes and embedding
methods, for the blocks diffusers' SD and SDXL U-Nets are made of.
"""

from __future__ import annotations

import torch

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
UNSUPPORTED = {"class_embed_type": "class embeddings", "num_class_embeds": "class embeddings",
               "center_input_sample": "centred input samples"}  # fmt: skip


def skip_count(unet) -> int:
    """How many skip features the down path makes (the largest ``depth``)."""
    return 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)


def check(unet, depth: int) -> None:
    """A clear error for a U-Net these passes do not cover, or a depth it does not have."""
    cfg = unet.config
    for option, what in UNSUPPORTED.items():
        if cfg.get(option):
            raise ValueError(f"deepcache does not cover U-Nets with {what} ({option}={cfg.get(option)!r})")
    if cfg.get("addition_embed_type") == "image_hint":
        raise ValueError("deepcache does not cover U-Nets with image hints (addition_embed_type='image_hint')")
    for blocks, allowed in ((unet.down_blocks, DOWN_BLOCKS), (unet.up_blocks, UP_BLOCKS)):
        for block in blocks:
            if type(block).__name__ not in allowed:
                raise ValueError(f"deepcache covers U-Net blocks {', '.join(DOWN_BLOCKS + UP_BLOCKS)}; this U-Net "
                                 f"has a {type(block).__name__}")  # fmt: skip
    if depth > skip_count(unet):
        raise ValueError(f"deepcache depth {depth} is more than this U-Net's {skip_count(unet)} skip connections; "
                         f"allowed: 1..{skip_count(unet)}")  # fmt: skip


def _embed(unet, sample, timestep, encoder_hidden_states, added, timestep_cond):
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
    return emb, context


def _attend(block, index: int, hidden, context):
    attentions = getattr(block, "attentions", None)
    return hidden if attentions is None else attentions[index](hidden, encoder_hidden_states=context,
                                                               return_dict=False)[0]  # fmt: skip


def _down_steps(unet, emb, context):
    """The down path after the input convolution, one function per skip feature it makes."""
    steps = []
    for block in unet.down_blocks:
        for i, resnet in enumerate(block.resnets):
            steps.append(lambda h, b=block, i=i, r=resnet: _attend(b, i, r(h, emb), context))
        if block.downsamplers is not None:
            steps.append(lambda h, b=block: _downsample(b, h))
    return steps


def _downsample(block, hidden):
    for downsampler in block.downsamplers:
        hidden = downsampler(hidden)
    return hidden


def _up_steps(unet, emb, context):
    """The up path, one function ``(hidden, skip) -> hidden`` per skip feature it takes (deepest first); a
    block's upsampler runs in its last layer's step."""
    steps = []
    for block in unet.up_blocks:
        last = len(block.resnets) - 1
        for i, resnet in enumerate(block.resnets):
            steps.append(lambda h, s, b=block, i=i, r=resnet, up=i == last: _up_layer(b, i, r, h, s, emb, context, up))
    return steps


def _up_layer(block, index, resnet, hidden, skip, emb, context, upsample: bool):
    hidden = _attend(block, index, resnet(torch.cat([hidden, skip], dim=1), emb), context)
    if upsample and block.upsamplers is not None:
        for upsampler in block.upsamplers:
            hidden = upsampler(hidden, None)
    return hidden


def _out(unet, sample):
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def full(unet, depth: int, sample, timestep, encoder_hidden_states, added=None, timestep_cond=None):
    """The U-Net's output, and the feature entering its last ``depth`` up-path layers."""
    emb, context = _embed(unet, sample, timestep, encoder_hidden_states, added, timestep_cond)
    hidden = unet.conv_in(sample)
    skips = [hidden]
    for step in _down_steps(unet, emb, context):
        hidden = step(hidden)
        skips.append(hidden)
    if unet.mid_block is not None:
        extra = {"encoder_hidden_states": context} if getattr(unet.mid_block, "has_cross_attention", False) else {}
        hidden = unet.mid_block(hidden, emb, **extra)
    feature = None
    for j, step in enumerate(_up_steps(unet, emb, context)):
        if j == len(skips) - depth:
            feature = hidden
        hidden = step(hidden, skips[len(skips) - 1 - j])
    return _out(unet, hidden), feature


def partial(unet, depth: int, feature, sample, timestep, encoder_hidden_states, added=None, timestep_cond=None):
    """The output from the first ``depth`` skip features and the last ``depth`` up layers, on the ``feature``
    an earlier full call kept."""
    emb, context = _embed(unet, sample, timestep, encoder_hidden_states, added, timestep_cond)
    hidden = unet.conv_in(sample)
    skips = [hidden]
    for step in _down_steps(unet, emb, context)[: depth - 1]:
        hidden = step(hidden)
        skips.append(hidden)
    hidden = feature
    for j, step in enumerate(_up_steps(unet, emb, context)[-depth:]):
        hidden = step(hidden, skips[depth - 1 - j])
    return _out(unet, hidden)
