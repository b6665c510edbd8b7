"""Train the Fashion-MNIST classifier behind the quality metrics (target: >= 91% test accuracy).

Augmentation: random shifts of up to 2 pixels and horizontal flips (the class of a garment does not depend on
either). After training the weights are saved (float16), reloaded, and the reloaded model computes the
reference statistics of the 10k test images, so the shipped file and the statistics always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.fashion import classifier as domain
from . import common, data

TARGET_ACCURACY = 0.91


@dataclass
class ClassifierSettings(common.TrainSettings):
    steps: int = 2000  # ~4.3 epochs at batch 128
    batch_size: int = 128
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 300
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    max_shift: int = 2
    kid_rows: int = 5000  # test-set feature rows kept for KID


def classifier_shape(size: str) -> dict:
    if size == "full":
        return {"widths": (32, 64, 128), "num_features": 128}
    return {"widths": (8, 16, 16), "num_features": 16}


def augment(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation (zero fill, as the padding) by up to ``max_shift`` pixels and random horizontal flip."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    if max_shift:
        padded = torch.nn.functional.pad(x, (max_shift,) * 4)
        dx, dy = (torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator).to(x.device) for _ in range(2))
        span = torch.arange(x.shape[-1], device=x.device)
        rows, cols = dy + span, dx + span  # [n, size] each: the window of every image
        batch = torch.arange(n, device=x.device).view(-1, 1, 1)
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # advanced dims come first
    return x


@torch.no_grad()
def accuracy(model, split: data.Split, device, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        x = data.to_unit(split.images[start : start + batch_size], device)
        correct += int((model(x).argmax(1).cpu() == split.labels[start : start + batch_size]).sum())
    return correct / len(split)


def train_classifier(out, settings: ClassifierSettings | None = None, progress: bool = True) -> common.TrainResult:
    settings = settings or ClassifierSettings()
    settings.check()
    timer = common.Timer()
    out = Path(out)
    device = common.resolve_device(settings.device)
    train = data.load_split("train", settings.data_root, settings.data_limit)
    test = data.load_split("test", settings.data_root, settings.data_limit)
    generator = common.seeded_generator(settings.seed)
    model = domain.FashionClassifier(**classifier_shape(settings.size)).to(device).train()
    opt, lr_sched = common.optimizer(model.parameters(), settings)
    batches = common.Batches(len(train), settings.batch_size, generator)
    images, labels = train.images.to(device), train.labels.to(device)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

    def step(i: int) -> torch.Tensor:
        idx = batches.next().to(device)
        x = augment(data.to_unit(images[idx]), settings.max_shift, generator)
        with common.autocast(device, settings.amp):
            logits = model(x)
        loss = loss_fn(logits.float(), labels[idx])
        common.optimizer_step(loss, model, opt, lr_sched, settings.grad_clip)
        return loss

    losses = common.train_loop(step, settings.steps, "classifier", progress)
    domain.save_classifier(model.cpu(), out)
    model = domain.load_classifier(out, device)  # float16-rounded weights: what ships
    test_accuracy = accuracy(model, test, device)
    reference = domain.reference_statistics(model, data.to_unit(test.images, device), settings.kid_rows, settings.seed)
    domain.save_reference(out / domain.REFERENCE_FILE, reference)
    metrics = {
        **common.loss_summary(losses), "test_accuracy": test_accuracy, "test_images": len(test),
        "meets_target": test_accuracy >= TARGET_ACCURACY, "params": common.count_params(model),
        "num_features": model.num_features, "fingerprint": reference["classifier"], "device": str(device),
        "train_images": len(train), "wall_s": timer.seconds(),
    }  # fmt: skip
    config = {**model.config(), "class_names": list(data.CLASS_NAMES), "test_accuracy": test_accuracy}
    domain.save_classifier(model.cpu(), out, extra=config)
    common.write_run(out, "classifier", settings, metrics)
    common.write_model_card(out, "Fashion-MNIST classifier (quality metrics)", {
        "Model": f"A {metrics['params']:,}-parameter CNN "
                 f"(`diffrt.models.fashion.classifier.FashionClassifier`), float16 weights. "
                 f"Its {model.num_features}-wide penultimate layer gives the domain FID/KID features.",
        "Data": common.DATA_CARD,
        "Training": f"`diffrt train classifier`: {common.run_summary(settings, metrics)} Settings:\n\n"
                    f"{common.settings_text(settings)}",
        "Metrics": f"Test accuracy {test_accuracy:.4f} on {len(test)} images (target {TARGET_ACCURACY}). "
                   f"`{domain.REFERENCE_FILE}`: FID/KID state of the test images for this exact classifier.",
        "Licence": "MIT (model and data).",
    })  # fmt: skip
    return common.TrainResult(out, losses, metrics)
