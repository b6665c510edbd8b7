"""The metrics classifier of the Fashion-MNIST domain: its architecture, weights files and reference statistics.

A small CNN trained by the project (``diffrt train classifier``) scores generated images: its predictions give
prompt adherence, its penultimate layer the features of domain FID/KID (:mod:`diffrt.bench.quality`). The real
side of FID/KID, the 10k test images, is stored as the metric's own state (feature sum and sum of outer
products, KID feature rows) in a file beside the classifier weights, tied to the exact classifier by its
weights fingerprint, so no dataset is needed at run time. The trainer writes these files, the benchmarks read
them: this module is what both share.

Images are float tensors [N, 3, 32, 32] in [0, 1] (what a pipeline returns with ``output_type="pt"``); the
classifier averages the channels (the data is grayscale).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...core import checksums
from ...core.fingerprint import weights_digest
from ..embedded import CLASSIFIER_NAME, MODELS_DIR

IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REFERENCE_FILE = "reference-test.safetensors"  # the 10k test images' metric state, beside the classifier
# Where the shipped classifier lives inside the installed package (diffrt/models/weights/ = runtime/models/weights/).
DEFAULT_CLASSIFIER_DIR = MODELS_DIR / CLASSIFIER_NAME
_GRAY_MEAN, _GRAY_STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics (28x28 images, [0, 1])


class FashionClassifier(nn.Module):
    """Three VGG-style stages (two 3x3 conv + BN + ReLU, 2x2 max-pool), global average pool, a
    ``num_features``-wide hidden layer (the FID features), and the 10-way output layer."""

    def __init__(self, widths=(32, 64, 128), num_features: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.widths, self.num_features, self.num_classes = tuple(widths), num_features, num_classes
        layers, channels = [], 1
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(channels, num_features), nn.ReLU())
        self.dropout = nn.Dropout(0.2)
        self.out = nn.Linear(num_features, num_classes)

    def config(self) -> dict:
        return {"widths": list(self.widths), "num_features": self.num_features, "num_classes": self.num_classes}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, num_features] of images [N, 3, 32, 32] in [0, 1]."""
        check_images(images)
        param = next(self.parameters())
        gray = images.to(param.device, param.dtype).mean(dim=1, keepdim=True)
        return self.hidden(self.body((gray - _GRAY_MEAN) / _GRAY_STD))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.features(images)))


def check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got {type(images).__name__} "
                         f"{getattr(images, 'dtype', '')}")  # fmt: skip
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images must be [N, 3, 32, 32], got {tuple(images.shape)}")


def fingerprint(model: nn.Module) -> str:
    """The weights fingerprint (:mod:`diffrt.core.fingerprint`): ties reference statistics to their classifier."""
    return weights_digest({"classifier": model})


def save_classifier(model: FashionClassifier, folder, dtype=torch.float16, extra: dict | None = None) -> Path:
    """Weights (safetensors, float16 by default: 0.6 MB) and config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({**model.config(), **(extra or {})}, indent=2))
    return folder


def load_classifier(folder=None, device="cpu") -> FashionClassifier:
    """The classifier in eval mode, float32; ``folder`` defaults to the shipped one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else DEFAULT_CLASSIFIER_DIR
    _verify_if_shipped(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} has no {name}: not a classifier folder (make one with `diffrt train classifier --out DIR`)"
            )
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        model = FashionClassifier(config["widths"], config["num_features"], config.get("num_classes", NUM_CLASSES))
        state = load_file(folder / WEIGHTS_FILE)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError, SafetensorError, OSError) as err:
        raise ValueError(f"could not load the classifier from {folder}: {type(err).__name__}: {err}") from err
    return model.to(device).eval()


def _verify_if_shipped(folder: Path) -> None:
    """The shipped classifier's files against its checksums (a folder of the user's own has none to check)."""
    if folder.resolve() == DEFAULT_CLASSIFIER_DIR.resolve() or (folder / checksums.MANIFEST).is_file():
        checksums.verify(folder)


class FeatureNet(nn.Module):
    """The classifier's penultimate layer as a torchmetrics feature extractor (float64 output)."""

    def __init__(self, classifier: FashionClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def train(self, mode: bool = True):  # the metric must never switch BatchNorm/Dropout to training
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).double()


# ------------------------------------------------------------------------------ reference statistics

def batches(images: torch.Tensor, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


def fid_metric(feature: nn.Module):
    """torchmetrics FID over a custom feature module (images stay float: ``normalize=True``)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)


@torch.no_grad()
def reference_statistics(classifier: FashionClassifier, images: torch.Tensor, kid_rows: int = 5000,
                         seed: int = 0, batch_size: int = 500) -> dict:  # fmt: skip
    """The real side of domain FID/KID: FID's own state after ``update(images, real=True)`` (float64 sums),
    and ``kid_rows`` feature rows (a seeded random subset, float16) for KID."""
    feature = FeatureNet(classifier)
    metric = fid_metric(feature)
    rows = []
    for batch in batches(images, batch_size):
        metric.update(batch, real=True)
        rows.append(feature(batch))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:kid_rows]
    return {
        "fid_sum": metric.real_features_sum.detach().cpu(),
        "fid_cov_sum": metric.real_features_cov_sum.detach().cpu(),
        "fid_n": metric.real_features_num_samples.detach().cpu(),
        "kid_features": torch.cat(rows)[order].half().cpu(),
        "classifier": fingerprint(classifier),
    }


def save_reference(path, reference: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in reference.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, Path(path), metadata={"classifier": reference["classifier"], "images": "fashion-mnist test"})
    return Path(path)


def load_reference(path=None, classifier: FashionClassifier | None = None) -> dict:
    """Reference statistics; with ``classifier``, checks they were computed with exactly that classifier."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_DIR / REFERENCE_FILE
    _verify_if_shipped(path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found (`diffrt train classifier` writes them)")
    try:
        with safe_open(str(path), "pt") as f:
            reference = {k: f.get_tensor(k) for k in f.keys()}
            reference["classifier"] = (f.metadata() or {}).get("classifier", "")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"could not read reference statistics {path}: {err}") from err
    missing = {"fid_sum", "fid_cov_sum", "fid_n", "kid_features"} - set(reference)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: not a reference statistics file")
    if classifier is not None and reference["classifier"] != fingerprint(classifier):
        raise ValueError(f"{path} was computed with a different classifier than the one given; recompute it with "
                         "diffrt.models.fashion.classifier.reference_statistics")  # fmt: skip
    return reference
