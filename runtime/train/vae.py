"""Train the VAE (AutoencoderKL, 32x32x3 <-> 8x8x4) and measure its latent scaling factor.

Loss: L1 + L2 reconstruction of the posterior sample's decoding, plus a very small KL term (per-element means).
At 4x downsampling of grayscale 32x32 images a plain reconstruction loss is enough: no perceptual or
adversarial term. The KL only keeps the posterior variance from collapsing to the clamp; the latent scale is
normalised afterwards by ``scaling_factor = 1 / std`` of the training latents, as Stable Diffusion's 0.18215.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import common, data, models


@dataclass
class VAESettings(common.TrainSettings):
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    scale_images: int = 10000  # training images whose latents measure the scaling factor


@torch.no_grad()
def encode(vae, images: torch.Tensor, device, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of uint8 [N, 32, 32] images, on the CPU."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        dist = vae.encode(data.to_model_input(images[start : start + batch_size], device)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def measure_scaling(vae, images: torch.Tensor, device, generator: torch.Generator) -> dict:
    """1 / std of posterior samples of the given images (what the U-Net trains on), and their mean."""
    mean, std = encode(vae, images, device)
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    return {"scaling_factor": float(1 / latents.std()), "latent_mean": float(latents.mean()),
            "latent_std": float(latents.std()), "posterior_std_mean": float(std.mean())}  # fmt: skip


@torch.no_grad()
def reconstruction_metrics(vae, images: torch.Tensor, device) -> dict:
    """L1, MSE and PSNR (pixels in [0, 1]) of the posterior-mean reconstructions."""
    l1 = mse = 0.0
    for start in range(0, len(images), 500):
        x = data.to_model_input(images[start : start + 500], device)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        diff = (recon - x) / 2  # [-1, 1] -> units of [0, 1]
        l1 += float(diff.abs().sum()) / diff[0].numel()
        mse += float(diff.square().sum()) / diff[0].numel()
    n = len(images)
    return {"l1": l1 / n, "mse": mse / n, "psnr_db": float(10 * torch.log10(torch.tensor(1.0 / (mse / n))))}


def train_vae(out, settings: VAESettings | None = None, progress: bool = True) -> common.TrainResult:
    settings = settings or VAESettings()
    settings.check()
    timer = common.Timer()
    out = Path(out)
    device = common.resolve_device(settings.device)
    train = data.load_split("train", settings.data_root, settings.data_limit)
    test = data.load_split("test", settings.data_root, settings.data_limit)
    generator = common.seeded_generator(settings.seed)
    vae = models.build_vae(settings.size).to(device).train()
    opt, lr_sched = common.optimizer(vae.parameters(), settings)
    batches = common.Batches(len(train), settings.batch_size, generator)
    images = train.images.to(device)

    def step(i: int) -> torch.Tensor:
        x = data.to_model_input(images[batches.next().to(device)])
        noise = torch.randn((x.shape[0], models.LATENT_CHANNELS, models.LATENT_SIZE, models.LATENT_SIZE),
                            generator=generator).to(device)  # fmt: skip
        with common.autocast(device, settings.amp, cpu=True):
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * noise
            recon = vae.decode(z).sample.float()
        loss = (recon - x).abs().mean() + (recon - x).square().mean()
        loss = loss + settings.kl_weight * dist.kl().float().mean() / z[0].numel()
        common.optimizer_step(loss, vae, opt, lr_sched, settings.grad_clip)
        return loss

    losses = common.train_loop(step, settings.steps, "vae", progress)
    vae.eval()
    scale_set = train.images[: settings.scale_images]
    scaling = measure_scaling(vae, scale_set, device, generator)
    vae.register_to_config(scaling_factor=scaling["scaling_factor"])
    metrics = {
        **common.loss_summary(losses), **scaling,
        "test_reconstruction": reconstruction_metrics(vae, test.images, device),
        "params": common.count_params(vae), "device": str(device), "train_images": len(train),
        "wall_s": timer.seconds(),
    }  # fmt: skip
    save_vae(vae.cpu(), out, settings, metrics)
    return common.TrainResult(out, losses, metrics)


def save_vae(vae, out: Path, settings: VAESettings, metrics: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    common.write_run(out, "vae", settings, metrics)
    rec = metrics["test_reconstruction"]
    common.write_model_card(out, "fashion VAE (AutoencoderKL)", {
        "Model": f"diffusers AutoencoderKL, {metrics['params']:,} parameters: 32x32x3 images <-> 8x8x4 latents. "
                 f"Latent scaling factor {metrics['scaling_factor']:.5f} (1 / std of {settings.scale_images} "
                 "training latents), stored in config.json.",
        "Data": common.DATA_CARD,
        "Training": f"L1 + L2 reconstruction + KL (weight {settings.kl_weight}), `diffrt train vae`: "
                    f"{common.run_summary(settings, metrics)} Settings:\n\n{common.settings_text(settings)}",
        "Metrics": f"Test-set reconstruction: L1 {rec['l1']:.4f}, PSNR {rec['psnr_db']:.2f} dB (pixels in [0, 1]).",
        "Licence": "MIT (model and data).",
    })  # fmt: skip
    return out
