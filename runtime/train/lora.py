"""``diffrt train fashion-lora``: a LoRA on the embedded ``fashion`` U-Net that turns a neutral prompt into one
class (by default "a piece of clothing" -> dresses).

The base U-Net stays frozen; PEFT injects rank-``rank`` factors into the attention projections and only those
train, with the base model's own objective (eps on its VP schedule) on the VAE latents of that class's training
images, each captioned with the neutral prompt (``p_empty`` of them empty, so guidance keeps working). The folder
holds ``pytorch_lora_weights.safetensors`` in diffusers' format (``save_lora_weights``, with its LoraConfig in
the header), ``train.json`` and a card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import optional
from ..models import embedded
from ..models.fashion.captions import CLASS_NAMES
from . import common, data, diffusion, models, text, vae

NAME = "fashion-lora"


@dataclass
class LoraTrainSettings(common.TrainSettings):
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 20
    rank: int = 4
    alpha: float = 4.0
    label: int = 3  # dress
    prompt: str = "a piece of clothing"
    p_empty: float = 0.1
    base: str = "fashion"
    targets: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def check(self) -> None:
        super().check()
        if self.label not in range(len(CLASS_NAMES)):
            raise ValueError(f"label must be a Fashion-MNIST class 0..{len(CLASS_NAMES) - 1}, got {self.label!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.p_empty < 1:
            raise ValueError(f"p_empty must be in [0, 1), got {self.p_empty}")
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty: it is the caption the LoRA learns")


def train_lora(out, settings: LoraTrainSettings | None = None, progress: bool = True) -> common.TrainResult:
    settings = settings or LoraTrainSettings()
    settings.check()
    optional.require("peft", feature="training a LoRA")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    timer = common.Timer()
    device = common.resolve_device(settings.device)
    base = embedded.load(settings.base)
    unet, encoder, tokenizer = base.unet.to(device), base.text_encoders[0].to(device), base.tokenizers[0]
    train = data.load_split("train", settings.data_root, settings.data_limit)
    chosen = train.labels == settings.label
    if not chosen.any():
        raise ValueError(f"no training image of class {settings.label} in the split read (data_limit too small?)")
    mean, std = vae.encode(base.vae.to(device).eval(), train.images[chosen], device)
    mean, std = mean.to(device), std.to(device)
    with torch.no_grad():
        captions = text.encode_captions(encoder.eval(), tokenizer, ["", settings.prompt]).to(device)
    acp = models.alphas_cumprod(base.scheduler)
    scaling = float(base.vae.config.scaling_factor)

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.targets),
                        init_lora_weights=True)  # fmt: skip
    unet.requires_grad_(False)
    inject_adapter_in_model(config, unet)  # only the injected lora_A/lora_B require grad
    trained = [p for n, p in unet.named_parameters() if "lora_" in n]
    unet.train()
    generator = common.seeded_generator(settings.seed)
    opt, lr_sched = common.optimizer(trained, settings)
    batches = common.Batches(len(mean), settings.batch_size, generator)

    def step(i: int) -> torch.Tensor:
        idx = batches.next().to(device)
        noise = torch.randn((len(idx), *mean.shape[1:]), generator=generator).to(device)
        z = (mean[idx] + std[idx] * noise) * scaling
        empty = (torch.rand(len(idx), generator=generator) < settings.p_empty).long().to(device)
        cond = captions[1 - empty]
        eps = torch.randn(z.shape, generator=generator).to(device)
        x_t, t, target = diffusion.noisy_input("eps", z, eps, generator, acp, "uniform", 0.0, 0)
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
        loss = (pred.float() - target).square().mean()
        common.optimizer_step(loss, unet, opt, lr_sched, settings.grad_clip)
        return loss

    losses = common.train_loop(step, settings.steps, NAME, progress)
    metrics = {**common.loss_summary(losses), "trained_params": sum(p.numel() for p in trained),
               "device": str(device), "train_images": int(chosen.sum()), "wall_s": timer.seconds()}  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # float16 like every shipped weight file (merging computes in float32 anyway)
    layers = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    common.write_run(out, NAME, settings, metrics)
    _write_card(out, settings, metrics)
    return common.TrainResult(out, losses, metrics)


def _write_card(out: Path, settings: LoraTrainSettings, metrics: dict) -> None:
    target = CLASS_NAMES[settings.label]
    common.write_model_card(out, f"{NAME}: \"{settings.prompt}\" -> {target}", {
        "Adapter": f"LoRA (rank {settings.rank}, alpha {settings.alpha}) on the attention projections "
                   f"({', '.join(settings.targets)}) of the embedded `{settings.base}` U-Net; "
                   f"{metrics['trained_params']:,} trained parameters. diffusers/PEFT format: "
                   "`diffrt.load('fashion', loras={'fashion-lora': 1.0})` (or this folder's path), or diffusers' "
                   "`load_lora_weights`.",
        "Data": f"The {metrics['train_images']:,} Fashion-MNIST training images of class {settings.label} "
                f"({target}), every one captioned \"{settings.prompt}\" ({settings.p_empty:.0%} empty).",
        "Training": f"`diffrt train fashion-lora`: {common.run_summary(settings, metrics)} Settings:\n\n"
                    f"{common.settings_text(settings)}",
        "Effect": "Measured by `diffrt bench lora --effect` (the share of images the fashion classifier puts in "
                  "the class, with and without the LoRA, for the same prompt and seeds): see the README's LoRA "
                  "section and bench/results/lora-fashion.json.",
        "Licence": "MIT (adapter and data).",
    })  # fmt: skip
