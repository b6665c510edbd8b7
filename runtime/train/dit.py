"""Train ``fashion-dit``: a small FLUX.1 transformer (``FluxTransformer2DModel``) with rectified flow on the
8x8x4 latents of the shipped fashion VAE.

Why FLUX's architecture and not SD3's: it is the layout with the most parts of its own (2x2 latent packing,
rotary position ids, double- then single-stream blocks, a pooled-text modulation), so one small model
exercises all of them on the CPU; the shared VAE's 4 channels pack into 16-channel tokens, so no new VAE is
needed. The 8x8 latent is 16 image tokens; the text is MiniLM's 16 token states (384-d) as the sequence and
their mean as the pooled vector (FLUX's CLIP slot), 10% empty captions for classifier-free guidance.

Objective as ``fashion-flow``: ``x_t = (1 - t) z + t eps``, t logit-normal, target ``eps - z``; the
transformer is told t itself (FLUX multiplies it by 1000 inside).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import folders
from ..models.components import Components
from ..models.families import flux_layout
from . import common, data, diffusion, text

# 3 double-stream + 6 single-stream blocks at width 128 (4 heads of 32): 3.47M parameters, 6.9 MB in float16.
# Rotary axes (8, 12, 12) split the head's 32 dims between the (unused) text axis, rows and columns.
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=6, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=text.HIDDEN_SIZE,
                   pooled_projection_dim=text.HIDDEN_SIZE, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
TINY_TRANSFORMER = {**TRANSFORMER, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                    "num_attention_heads": 2, "axes_dims_rope": (4, 6, 6)}  # fmt: skip
# FLUX's resolution shift, set so the trained 32 px (16 tokens) gets none (mu = 0) and 128 px (256 tokens)
# the shift exp(0.5) = 1.65: larger images keep more steps at high noise, as FLUX.1 does.
SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_image_seq_len=16,
                 max_image_seq_len=256, base_shift=0.0, max_shift=0.5, shift=1.0, time_shift_type="exponential")
DEFAULTS = {"steps": 8, "sampler": "euler", "guidance": 3.0, "size": 32}  # guidance from the sweep in the card


@dataclass
class DiTSettings(diffusion.LatentTrainSettings):
    """fashion-dit's settings: those of fashion-flow (the VAE: the shipped fashion-vae or `diffrt train vae`'s)."""


def build_transformer(size: str = "full"):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**(TRANSFORMER if size == "full" else TINY_TRANSFORMER))


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)


def predict(transformer, x_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The velocity for latents ``x_t`` [B, 4, 8, 8] at flow times ``t`` [B] and token states [B, L, 384],
    through the packing and ids the FLUX family's graph uses at inference."""
    h, w = x_t.shape[-2:]
    out = transformer(
        hidden_states=flux_layout.pack(x_t), timestep=t, encoder_hidden_states=states,
        pooled_projections=states.mean(dim=1), txt_ids=flux_layout.text_ids(states.shape[1], x_t.device),
        img_ids=flux_layout.image_ids(h, w, x_t.device),
    ).sample  # fmt: skip
    return flux_layout.unpack(out, h, w)


def train_dit(out, settings: DiTSettings | None = None, progress: bool = True) -> common.TrainResult:
    settings = settings or DiTSettings()
    settings.check()
    timer = common.Timer()
    out = Path(out)
    device = common.resolve_device(settings.device)
    train = data.load_split("train", settings.data_root, settings.data_limit)
    vae = diffusion.load_vae(settings.vae, device)
    encoder, tokenizer = text.load_text_encoder()
    latents = diffusion.prepare_latents(vae, encoder.to(device), tokenizer, train, device, settings.p_empty)

    generator = common.seeded_generator(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        transformer = build_transformer(settings.size).to(device).train()
    ema = common.EMA(transformer, settings.ema_decay)
    opt, lr_sched = common.optimizer(transformer.parameters(), settings)
    batches = common.Batches(len(train), settings.batch_size, generator)

    def step(i: int) -> torch.Tensor:
        z, states = latents.batch(batches.next(), generator)
        noise = torch.randn(z.shape, generator=generator).to(device)
        t = diffusion.sample_flow_t(z.shape[0], settings.t_sampling, generator).to(device)
        x_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * noise
        with common.autocast(device, settings.amp):
            pred = predict(transformer, x_t, t, states)
        loss = (pred.float() - (noise - z)).square().mean()
        common.optimizer_step(loss, transformer, opt, lr_sched, settings.grad_clip)
        ema.update(transformer, i)
        return loss

    losses = common.train_loop(step, settings.steps, "fashion-dit", progress)
    metrics = {
        **common.loss_summary(losses), "params": common.count_params(transformer), "device": str(device),
        "train_images": len(train), "captions": len(latents.captions), "wall_s": timer.seconds(),
    }  # fmt: skip
    save_dit(out, ema.model.cpu().eval(), vae.cpu(), encoder.cpu(), tokenizer, settings, metrics)
    return common.TrainResult(out, losses, metrics)


def save_dit(out: Path, transformer, vae, encoder, tokenizer, settings, metrics) -> Path:
    """A diffrt model folder of the FLUX family (transformer, VAE, MiniLM encoder, scheduler), train.json and
    a model card. diffusers' ``FluxPipeline`` does not load it: its text encoders are MiniLM, not CLIP + T5."""
    components = Components("fashion-dit", "flux", None, vae.eval(), [encoder.eval()], [tokenizer],
                            flow_scheduler(), defaults=dict(DEFAULTS), transformer=transformer)  # fmt: skip
    folders.save_folder(components, out)
    common.write_run(out, "fashion-dit", settings, metrics)
    common.write_model_card(out, "fashion-dit: a FLUX.1-architecture transformer on Fashion-MNIST", {
        "Model": f"diffusers FluxTransformer2DModel, {metrics['params']:,} parameters ({settings.size}: "
                 f"{TRANSFORMER if settings.size == 'full' else TINY_TRANSFORMER}), on the 8x8x4 latents of the "
                 "fashion VAE packed 2x2 into 16 tokens of 16 channels, with FLUX's rotary position ids. "
                 "Rectified flow (velocity noise - x0, logit-normal t). Text: frozen all-MiniLM-L6-v2 per-token "
                 "384-d states (16 tokens) as the sequence, their mean as the pooled vector. Scheduler: "
                 f"FlowMatchEulerDiscreteScheduler {SCHEDULER}. Sampling defaults (diffrt.json): {DEFAULTS}.",
        "Data": common.DATA_CARD + " Captions: several phrasings per class, 10% empty (classifier-free guidance).",
        "Training": f"`diffrt train fashion-dit`: {common.run_summary(settings, metrics)} Settings:\n\n"
                    f"{common.settings_text(settings)}",
        "Metrics": "Not measured yet: see `diffrt bench samplers` (prompt adherence, domain FID/KID).",
        "Licence": "MIT (model and data); the text encoder is all-MiniLM-L6-v2 (Apache-2.0).",
    })  # fmt: skip
    return out
