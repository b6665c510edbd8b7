"""``diffrt train fashion-controlnet``: a ControlNet for the embedded ``fashion`` model that follows Canny edge
maps of Fashion-MNIST images.

As in the ControlNet paper (Zhang et al. 2023): the ControlNet starts as a copy of the frozen U-Net's encoder
(diffusers' ``ControlNetModel.from_unet``) with zero convolutions on its outputs, so training starts from the
base model's own predictions; only the ControlNet trains, with the base model's objective (eps on its VP
schedule). Each training image's latents are paired with its own edge map (:mod:`diffrt.models.fashion.edges`) and one
of its class's captions, half of them empty (the paper's prompt dropout: the edges alone must carry the
shape). Its conditioning embedding downsamples the edge map 4x, the ``fashion`` VAE's factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import embedded
from ..models.fashion.edges import control_pictures, edge_maps
from . import common, data, diffusion, models

NAME = "fashion-controlnet"


@dataclass
class ControlNetTrainSettings(common.TrainSettings):
    steps: int = 5000
    batch_size: int = 64
    lr: float = 3e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    p_empty: float = 0.5  # the ControlNet paper's prompt dropout
    base: str = "fashion"
    embedding_channels: tuple = (16, 32, 64)  # the edge map's embedding: 2 stride-2 stages = the VAE's 4x

    def check(self) -> None:
        super().check()
        if not 0 <= self.p_empty < 1:
            raise ValueError(f"p_empty must be in [0, 1), got {self.p_empty}")


def train_controlnet(out, settings: ControlNetTrainSettings | None = None, progress: bool = True) -> common.TrainResult:
    settings = settings or ControlNetTrainSettings()
    settings.check()
    from diffusers import ControlNetModel

    timer = common.Timer()
    device = common.resolve_device(settings.device)
    base = embedded.load(settings.base)
    unet = base.unet.to(device).eval().requires_grad_(False)
    train = data.load_split("train", settings.data_root, settings.data_limit)
    edges = control_pictures(edge_maps(train.images)).to(device)
    latents = diffusion.prepare_latents(base.vae.to(device).eval(), base.text_encoders[0].to(device).eval(),
                                        base.tokenizers[0], train, device, settings.p_empty)  # fmt: skip
    acp = models.alphas_cumprod(base.scheduler)

    generator = common.seeded_generator(settings.seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(settings.embedding_channels))
    controlnet = controlnet.to(device).train()
    opt, lr_sched = common.optimizer(controlnet.parameters(), settings)
    batches = common.Batches(len(train), settings.batch_size, generator)

    def step(i: int) -> torch.Tensor:
        idx = batches.next()
        z, cond = latents.batch(idx, generator)
        noise = torch.randn(z.shape, generator=generator).to(device)
        x_t, t, target = diffusion.noisy_input("eps", z, noise, generator, acp, "uniform", 0.0, 0)
        down, mid = controlnet(x_t, t, encoder_hidden_states=cond, controlnet_cond=edges[idx.to(device)],
                               return_dict=False)  # fmt: skip
        pred = unet(x_t, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample  # fmt: skip
        loss = (pred.float() - target).square().mean()
        common.optimizer_step(loss, controlnet, opt, lr_sched, settings.grad_clip)
        return loss

    losses = common.train_loop(step, settings.steps, NAME, progress)
    metrics = {**common.loss_summary(losses), "params": common.count_params(controlnet), "device": str(device),
               "train_images": len(train), "wall_s": timer.seconds()}  # fmt: skip
    out = Path(out)
    # float16 like every shipped weight file
    nn.Module.to(controlnet, "cpu", torch.float16).eval().save_pretrained(out, safe_serialization=True)
    common.write_run(out, NAME, settings, metrics)
    _write_card(out, settings, metrics)
    return common.TrainResult(out, losses, metrics)


def _write_card(out: Path, settings: ControlNetTrainSettings, metrics: dict) -> None:
    common.write_model_card(out, f"{NAME}: Canny edges -> Fashion-MNIST images", {
        "Model": f"A diffusers `ControlNetModel` ({metrics['params']:,} parameters) copied from the embedded "
                 f"`{settings.base}` U-Net's encoder, with a conditioning embedding of channels "
                 f"{tuple(settings.embedding_channels)} (4x down, the VAE's factor). Control images: Canny edge maps "
                 "(OpenCV, thresholds 100/200) as white edges on black, 32x32. "
                 "`diffrt.load('fashion', controlnet='fashion-controlnet')`, then `control_image=`; or diffusers' "
                 "`ControlNetModel.from_pretrained` on this folder.",
        "Data": f"{common.DATA_CARD} Each of the {metrics['train_images']:,} training images gives its own edge map "
                f"and one of its class's captions, {settings.p_empty:.0%} of them empty.",
        "Training": f"`diffrt train fashion-controlnet`: {common.run_summary(settings, metrics)} Settings:\n\n"
                    f"{common.settings_text(settings)}",
        "Evaluation": "Measured by `diffrt bench controlnet` on held-out test images: see the README's ControlNet "
                      "section and bench/results/controlnet-fashion.json.",
        "Licence": "MIT (model and data).",
    })  # fmt: skip

