"""Distil ``fashion-lcm``, a latent consistency model (Luo et al. 2023), from the eps teacher ``fashion``.

Consistency distillation with guidance folded in, as diffusers' LCM distillation script does it:

* The skipping-step schedule: ``N`` (50) timesteps ``k, 2k, ..., 1000`` minus one, ``k = 1000 // N``: exactly
  the timesteps LCMScheduler(original_inference_steps=N) samples from, so diffrt's lcm sampler and diffusers'
  LCMScheduler visit only timesteps the student was trained on.
* A step: noise latents to ``t = t_n``; the teacher, with classifier-free guidance at a scale ``w`` drawn
  uniformly from [guidance_min, guidance_max], takes one DDIM step to ``s = t_n - k`` (0 for the first); the
  EMA target network maps ``x_s`` to its consistency output; the student maps ``x_t`` to its own, and a
  pseudo-Huber loss pulls the two together.
* Consistency outputs use LCM's boundary scalings ``c_skip * x + c_out * x0`` with ``timestep_scaling`` 10
  (``diffrt.core.denoisers.consistency_scalings``; the pipeline reads it from the LCMScheduler config).
* The student is the teacher's U-Net plus a guidance embedding (``time_cond_proj_dim``): the sinusoidal
  embedding of ``(w - 1) * 1000``, as ``diffrt.pipeline.pipe.guidance_embedding`` makes it at inference. Its
  projection starts at zero, so the student starts as the teacher.

Autocast is off by default: ``x0 = (x - sigma eps) / alpha`` divides by alpha = 0.068 at t = 999 (the teacher's
scaled_linear schedule), and bfloat16 noise in eps would be amplified 15-fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import loading
from . import common, data, models
from .diffusion import prepare_latents, save_pipeline

DEFAULTS = {"steps": 4, "sampler": "lcm", "guidance": 4.0}  # provisional until the quality sweep


@dataclass
class LCMSettings(common.TrainSettings):
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    amp: bool = False
    teacher: str | None = None  # a `fashion` folder (eps prediction)
    target_decay: float = 0.95  # EMA of the target network (LCM's value)
    num_ddim_timesteps: int = 50  # N of the skipping schedule = LCMScheduler.original_inference_steps
    guidance_min: float = 2.0  # guidance scale range (diffrt/diffusers convention: 1 = no guidance)
    guidance_max: float = 8.0
    huber_c: float = 1e-3
    timestep_scaling: float = 10.0
    p_empty: float = 0.0  # LCM trains the student on conditional prompts only
    cond_dim: int = models.LCM_COND_DIM
    cond_init: str = "zero"  # the guidance projection: "zero" (starts as the teacher) or "random" (Linear's init)

    def check(self) -> None:
        super().check()
        if self.teacher is None:
            raise ValueError("LCM distillation needs the eps teacher: give --teacher DIR (a `fashion` folder)")
        if not 1 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 1 <= guidance_min <= guidance_max, got {self.guidance_min}, {self.guidance_max}")
        if self.cond_init not in ("zero", "random"):
            raise ValueError(f"cond_init must be 'zero' or 'random', got {self.cond_init!r}")
        if not 1 <= self.num_ddim_timesteps <= models.NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"num_ddim_timesteps must be in 1..{models.NUM_TRAIN_TIMESTEPS}")


def guidance_embedding(scales: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] guidance scales -> [B, dim]: sin/cos of ``(w - 1) * 1000`` (``diffrt.pipeline.pipe.guidance_embedding``)."""
    w = (scales.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None]
    return torch.nn.functional.pad(torch.cat([args.sin(), args.cos()], dim=1), (0, dim % 2))


def skipping_schedule(num_train: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_n, t_n - k clamped at 0), ascending: LCMScheduler's ``lcm_origin_timesteps`` and their predecessors."""
    k = num_train // n
    t = torch.arange(1, n + 1) * k - 1
    return t, (t - k).clamp(min=0)


def consistency_output(eps, x, t, acp, timestep_scaling: float) -> torch.Tensor:
    """``c_skip(t) x + c_out(t) x0(eps)`` for an eps-prediction model, per sample."""
    from ..core.denoisers import consistency_scalings

    abar = acp[t].view(-1, 1, 1, 1).to(x)
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    c_skip, c_out = consistency_scalings(t.to(x).view(-1, 1, 1, 1), timestep_scaling=timestep_scaling)
    return c_skip * x + c_out * x0


def make_student(teacher_unet, cond_dim: int, cond_init: str = "zero"):
    """The teacher's architecture with a guidance embedding input. With ``cond_init`` "zero" it starts as the
    teacher; "random" keeps Linear's default init of the guidance projection (as diffusers' LCM script does),
    so the guidance input acts from the first step."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": cond_dim})
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"teacher and student U-Nets differ: missing {missing}, unexpected {unexpected}")
    if cond_init == "zero":
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def load_teacher(folder):
    teacher = loading.load_components(folder, dtype=torch.float32)
    if teacher.is_flow or teacher.is_consistency or teacher.prediction_type != "epsilon":
        raise ValueError(f"{folder}: the LCM teacher must be an eps-prediction model (a `fashion` folder), "
                         f"got {type(teacher.scheduler).__name__} / {teacher.prediction_type}")  # fmt: skip
    if teacher.unet.config.get("time_cond_proj_dim"):
        raise ValueError(f"{folder}: the teacher already takes a guidance embedding (an LCM?)")
    return teacher


def train_lcm(out, settings: LCMSettings | None = None, progress: bool = True) -> common.TrainResult:
    settings = settings or LCMSettings()
    settings.check()
    timer = common.Timer()
    out = Path(out)
    device = common.resolve_device(settings.device)
    teacher = load_teacher(settings.teacher)
    train = data.load_split("train", settings.data_root, settings.data_limit)
    encoder, tokenizer = teacher.text_encoders[0].to(device), teacher.tokenizers[0]
    vae = teacher.vae.to(device)
    latents = prepare_latents(vae, encoder, tokenizer, train, device, settings.p_empty)
    uncond = latents.embeddings[latents.captions.index(data.EMPTY_CAPTION)]
    acp = models.alphas_cumprod(teacher.scheduler).to(device)
    starts, prevs = skipping_schedule(len(acp), settings.num_ddim_timesteps)

    generator = common.seeded_generator(settings.seed)
    teacher_unet = teacher.unet.to(device).eval().requires_grad_(False)
    student = make_student(teacher_unet, settings.cond_dim, settings.cond_init).to(device).train()
    target = common.EMA(student, settings.target_decay, warmup=False)
    opt, lr_sched = common.optimizer(student.parameters(), settings)
    batches = common.Batches(len(train), settings.batch_size, generator)

    def step(i: int) -> torch.Tensor:
        z, cond = latents.batch(batches.next(), generator)
        n = z.shape[0]
        index = torch.randint(0, len(starts), (n,), generator=generator)
        t, s = starts[index].to(device), prevs[index].to(device)
        noise = torch.randn(z.shape, generator=generator).to(device)
        low, high = settings.guidance_min, settings.guidance_max
        scale = low + (high - low) * torch.rand(n, generator=generator)
        w_emb = guidance_embedding(scale, settings.cond_dim).to(device)
        scale = scale.to(device).view(-1, 1, 1, 1)
        abar_t = acp[t].view(-1, 1, 1, 1).float()
        x_t = abar_t.sqrt() * z + (1 - abar_t).sqrt() * noise

        with common.autocast(device, settings.amp):
            eps = student(x_t, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample.float()
        prediction = consistency_output(eps, x_t, t, acp, settings.timestep_scaling)
        with torch.no_grad(), common.autocast(device, settings.amp):
            both = teacher_unet(
                torch.cat([x_t, x_t]),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([cond, uncond.expand_as(cond)]),
            ).sample.float()
            eps_c, eps_u = both.chunk(2)
            eps_g = eps_u + scale * (eps_c - eps_u)
            x0_g = (x_t - (1 - abar_t).sqrt() * eps_g) / abar_t.sqrt()
            abar_s = acp[s].view(-1, 1, 1, 1).float()
            x_s = abar_s.sqrt() * x0_g + (1 - abar_s).sqrt() * eps_g  # the teacher's DDIM step t -> s
            eps_target = target.model(x_s, s, encoder_hidden_states=cond, timestep_cond=w_emb).sample.float()
            goal = consistency_output(eps_target, x_s, s, acp, settings.timestep_scaling)
        loss = ((prediction - goal).square() + settings.huber_c**2).sqrt().mean() - settings.huber_c
        common.optimizer_step(loss, student, opt, lr_sched, settings.grad_clip)
        target.update(student, i)
        return loss

    losses = common.train_loop(step, settings.steps, "fashion-lcm", progress)
    metrics = {
        **common.loss_summary(losses), "params": common.count_params(student), "device": str(device),
        "train_images": len(train), "wall_s": timer.seconds(),
    }  # fmt: skip
    scheduler = models.lcm_scheduler(teacher.scheduler.config, settings.num_ddim_timesteps, settings.timestep_scaling)
    save_pipeline(out, "fashion-lcm", target.model.cpu(), vae.cpu(), encoder.cpu(), tokenizer, scheduler,
                  DEFAULTS, settings, metrics)  # fmt: skip
    return common.TrainResult(out, losses, metrics)
