"""Train the text-to-image U-Nets on VAE latents: ``fashion`` (eps, VP) and ``fashion-flow`` (rectified flow).

Both read the training set once through the VAE encoder (posterior mean and std, kept on the device; each
step draws a fresh posterior sample, as Stable Diffusion trains) and the caption embeddings once through the
frozen MiniLM encoder. 10% of the captions are the empty caption, so classifier-free guidance works.

eps: ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` with integer t uniform in [0, 1000), target eps; the
betas are Stable Diffusion's scaled_linear by default (``models.VP_BETAS`` says why not DDPM's linear).
flow: ``x_t = (1 - t) z + t eps`` with t logit-normal (SD3's choice: sigmoid of a standard normal puts most
steps at mid noise, where the velocity is hardest to learn), the U-Net told ``1000 t``, target ``eps - z``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import folders
from ..models.components import Components
from . import common, data, models, text

OBJECTIVES = ("eps", "flow")
T_SAMPLING = ("logit_normal", "uniform")
# diffrt.json sampling defaults, as the quality sweeps chose them (the shipped models' cards show the sweeps).
DEFAULTS = {
    "eps": {"steps": 20, "sampler": "dpmpp_2m", "guidance": 6.0},
    "flow": {"steps": 8, "sampler": "euler", "guidance": 4.0},
}


@dataclass
class LatentTrainSettings(common.TrainSettings):
    """What the text-to-image denoisers on VAE latents share (the shipped models' settings)."""

    steps: int = 2400
    batch_size: int = 128
    lr: float = 6e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    p_empty: float = data.P_EMPTY
    t_sampling: str = "logit_normal"  # flow only
    vae: str | None = None  # folder written by `diffrt train vae`

    def check(self) -> None:
        super().check()
        if self.t_sampling not in T_SAMPLING:
            raise ValueError(f"t_sampling must be one of {T_SAMPLING}, got {self.t_sampling!r}")
        if self.vae is None:
            raise ValueError("the denoisers train on VAE latents: give the VAE folder (--vae DIR from `diffrt train "
                             "vae`)")  # fmt: skip


@dataclass
class DiffusionSettings(LatentTrainSettings):
    objective: str = "eps"
    init: str | None = None  # start from this trained folder's U-Net instead of a fresh one (see initial_unet)
    beta_schedule: str = "scaled_linear"  # eps only: a key of models.VP_BETAS
    high_t_share: float = 0.0  # eps only: share of timesteps drawn from [high_t_min, 1000) instead of [0, 1000)
    high_t_min: int = 600

    def check(self) -> None:
        super().check()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0 <= self.high_t_share <= 1 or not 0 <= self.high_t_min < models.NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"need 0 <= high_t_share <= 1 and 0 <= high_t_min < {models.NUM_TRAIN_TIMESTEPS}, "
                             f"got {self.high_t_share}, {self.high_t_min}")  # fmt: skip
        if self.beta_schedule not in models.VP_BETAS:
            raise ValueError(f"beta_schedule must be one of {tuple(models.VP_BETAS)}, got {self.beta_schedule!r}")


def load_vae(folder, device):
    """A VAE folder written by ``diffrt train vae`` (checks it maps 32x32x3 to 8x8x4)."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a VAE folder (no config.json); make one with `diffrt train vae`")
    vae = folders.load_model(AutoencoderKL, folder, "vae")
    if vae.config.latent_channels != models.LATENT_CHANNELS or len(vae.config.block_out_channels) != 3:
        raise ValueError(f"{folder}: expected a 3-block VAE with {models.LATENT_CHANNELS} latent channels")
    return vae.to(device).eval().requires_grad_(False)


@dataclass
class LatentData:
    """Everything a U-Net step samples from, on the training device."""

    mean: torch.Tensor  # [N, 4, 8, 8] posterior means, unscaled
    std: torch.Tensor
    labels: torch.Tensor  # on the CPU, where the caption draws happen
    embeddings: torch.Tensor  # [captions, L, 384]
    captions: list[str]
    sampler: data.CaptionSampler
    scaling_factor: float

    def batch(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled posterior samples and caption embeddings of training items ``idx``."""
        device = self.mean.device
        noise = torch.randn((len(idx), *self.mean.shape[1:]), generator=generator).to(device)
        caption_ids = self.sampler(self.labels[idx], generator).to(device)
        idx = idx.to(device)
        z = (self.mean[idx] + self.std[idx] * noise) * self.scaling_factor
        return z, self.embeddings[caption_ids]


def prepare_latents(vae, encoder, tokenizer, split: data.Split, device, p_empty: float) -> LatentData:
    from .vae import encode

    mean, std = encode(vae, split.images, device)
    captions, per_class = data.caption_table()
    embeddings = text.encode_captions(encoder, tokenizer, captions)
    return LatentData(
        mean.to(device), std.to(device), split.labels.cpu(), embeddings.to(device), captions,
        data.CaptionSampler(per_class, p_empty), float(vae.config.scaling_factor),
    )  # fmt: skip


def sample_flow_t(n: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """Flow times in (0, 1): sigmoid of a standard normal (logit-normal), or uniform."""
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    return torch.rand(n, generator=generator)


def sample_eps_t(n: int, steps: int, high_t_share: float, high_t_min: int, generator) -> torch.Tensor:
    """Integer timesteps uniform in [0, steps), a ``high_t_share`` of them uniform in [high_t_min, steps).

    Oversampling high noise was the first attempt at the linear-betas model's failure near pure noise (see
    ``models.VP_BETAS``); it did not cure it, the scaled_linear schedule did. Kept (default 0) to reproduce it.
    """
    t = torch.randint(0, steps, (n,), generator=generator)
    high = torch.randint(high_t_min, steps, (n,), generator=generator)
    return torch.where(torch.rand(n, generator=generator) < high_t_share, high, t)


def noisy_input(objective: str, z, noise, generator, acp: torch.Tensor, t_sampling: str,
                high_t_share: float = 0.0, high_t_min: int = 0):  # fmt: skip
    """(x_t, model timestep, regression target) for one batch of clean latents ``z``."""
    n = z.shape[0]
    if objective == "eps":
        t = sample_eps_t(n, len(acp), high_t_share, high_t_min, generator)
        abar = acp[t].to(z.device, torch.float32).view(-1, 1, 1, 1)
        return abar.sqrt() * z + (1 - abar).sqrt() * noise, t.to(z.device), noise
    t = sample_flow_t(n, t_sampling, generator).to(z.device).view(-1, 1, 1, 1)
    return (1 - t) * z + t * noise, (t.flatten() * models.NUM_TRAIN_TIMESTEPS), noise - z


def initial_unet(settings: DiffusionSettings, cross_attention_dim: int):
    """A fresh U-Net, or the U-Net of the trained folder ``settings.init``.

    An eps model may also start from a flow model: the text conditioning and the image features carry over,
    only the meaning of the output and of the timestep is relearned (tried for ``fashion``: its card compares
    it with continuing the eps runs). A flow model does not start from an eps one, and an LCM student (guidance
    input) is no starting point.
    """
    if settings.init is None:
        return models.build_unet(settings.size, cross_attention_dim=cross_attention_dim)
    previous = folders.load_folder(Path(settings.init), dtype=torch.float32)
    if previous.is_consistency or (settings.objective == "flow" and not previous.is_flow):
        kind = "a consistency" if previous.is_consistency else "an eps"
        allowed = "a flow folder" if settings.objective == "flow" else "an eps or flow folder"
        raise ValueError(f"{settings.init} holds {kind} model, which cannot start a {settings.objective!r} model: "
                         f"give {allowed}")  # fmt: skip
    if previous.unet.config.cross_attention_dim != cross_attention_dim:
        raise ValueError(f"{settings.init}: its U-Net attends to {previous.unet.config.cross_attention_dim}-d text "
                         f"states, the text encoder gives {cross_attention_dim}-d")  # fmt: skip
    return previous.unet


def train_diffusion(out, settings: DiffusionSettings, progress: bool = True) -> common.TrainResult:
    settings.check()
    timer = common.Timer()
    out = Path(out)
    device = common.resolve_device(settings.device)
    train = data.load_split("train", settings.data_root, settings.data_limit)
    vae = load_vae(settings.vae, device)
    encoder, tokenizer = text.load_text_encoder()
    latents = prepare_latents(vae, encoder.to(device), tokenizer, train, device, settings.p_empty)
    eps_scheduler = models.eps_scheduler(settings.beta_schedule)
    scheduler = eps_scheduler if settings.objective == "eps" else models.flow_scheduler()
    acp = models.alphas_cumprod(eps_scheduler)

    generator = common.seeded_generator(settings.seed)
    unet = initial_unet(settings, encoder.config.hidden_size).to(device).train()
    ema = common.EMA(unet, settings.ema_decay)
    opt, lr_sched = common.optimizer(unet.parameters(), settings)
    batches = common.Batches(len(train), settings.batch_size, generator)

    def step(i: int) -> torch.Tensor:
        z, cond = latents.batch(batches.next(), generator)
        noise = torch.randn(z.shape, generator=generator).to(device)
        x_t, t, target = noisy_input(settings.objective, z, noise, generator, acp, settings.t_sampling,
                                     settings.high_t_share, settings.high_t_min)  # fmt: skip
        with common.autocast(device, settings.amp):
            pred = unet(x_t, t, encoder_hidden_states=cond).sample
        loss = (pred.float() - target).square().mean()
        common.optimizer_step(loss, unet, opt, lr_sched, settings.grad_clip)
        ema.update(unet, i)
        return loss

    name = "fashion" if settings.objective == "eps" else "fashion-flow"
    losses = common.train_loop(step, settings.steps, name, progress)
    metrics = {
        **common.loss_summary(losses), "params": common.count_params(unet), "device": str(device),
        "train_images": len(train), "captions": len(latents.captions), "wall_s": timer.seconds(),
    }  # fmt: skip
    save_pipeline(out, name, ema.model.cpu(), vae.cpu(), encoder.cpu(), tokenizer, scheduler,
                  DEFAULTS[settings.objective], settings, metrics)  # fmt: skip
    return common.TrainResult(out, losses, metrics)


def train_eps(out, settings: DiffusionSettings | None = None, progress: bool = True) -> common.TrainResult:
    settings = settings or DiffusionSettings()
    settings.objective = "eps"
    return train_diffusion(out, settings, progress)


def train_flow(out, settings: DiffusionSettings | None = None, progress: bool = True) -> common.TrainResult:
    settings = settings or DiffusionSettings()
    settings.objective = "flow"
    return train_diffusion(out, settings, progress)


_DESCRIPTIONS = {
    "fashion": "epsilon prediction on a variance-preserving schedule (1000 steps; betas in Settings)",
    "fashion-flow": "rectified flow: velocity (noise - x0) prediction, timestep 1000 t, logit-normal t in training",
    "fashion-lcm": "latent consistency model distilled from `fashion` with classifier-free guidance folded in "
                   "(guidance scale as a timestep_cond embedding); 1-4 steps with the lcm sampler",
}  # fmt: skip


def save_pipeline(out: Path, name, unet, vae, encoder, tokenizer, scheduler, defaults, settings, metrics) -> Path:
    """A diffusers-format StableDiffusionPipeline folder (diffrt.load and diffusers both read it), train.json
    and a model card."""
    components = Components(name, "sd", unet.eval(), vae.eval(), [encoder.eval()], [tokenizer], scheduler,
                            defaults=dict(defaults))  # fmt: skip
    folders.save_folder(components, out)
    common.write_run(out, name, settings, metrics)
    common.write_model_card(out, f"{name}: text-to-image latent diffusion on Fashion-MNIST", {
        "Model": f"diffusers UNet2DConditionModel, {metrics['params']:,} parameters, on the 8x8x4 latents of the "
                 f"fashion VAE; {_DESCRIPTIONS[name]}. Text encoder: frozen all-MiniLM-L6-v2 (BertModel, "
                 f"per-token 384-d states, prompts padded to {tokenizer.model_max_length} tokens). "
                 f"Scheduler: {type(scheduler).__name__}. Sampling defaults (diffrt.json): {defaults}.",
        "Data": common.DATA_CARD + " Captions: several phrasings per class, 10% empty (classifier-free guidance).",
        "Training": f"`diffrt train {name}`: {common.run_summary(settings, metrics)} Settings:\n\n"
                    f"{common.settings_text(settings)}",
        "Metrics": "Not measured yet: see `diffrt.bench.quality` (prompt adherence, domain FID/KID).",
        "Licence": "MIT (model and data); the text encoder is all-MiniLM-L6-v2 (Apache-2.0).",
    })  # fmt: skip
    return out
