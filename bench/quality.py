"""Image-quality metrics of the Fashion-MNIST models: prompt adherence and domain FID/KID, plus Inception FID.

A small CNN trained by the project on Fashion-MNIST (``diffrt train classifier``) serves both metrics:

* prompt adherence: the share of images generated for a class prompt that it classifies as that class;
* domain FID / KID: torchmetrics' FrechetInceptionDistance / KernelInceptionDistance with the classifier's
  penultimate layer as the feature network. The real side is the 10k test images, stored as the metric's own
  state (feature sum and sum of outer products, KID feature rows) in a file beside the classifier weights,
  so no dataset is needed at run time.

Images are float tensors [N, 3, 32, 32] in [0, 1] (what a pipeline returns with ``output_type="pt"``); the
classifier averages the channels (the data is grayscale).

Standard Inception FID (for users' own models) goes through torchmetrics and torch-fidelity with the FID
Inception weights file given by path (nothing is downloaded).

torchmetrics' contract for a custom feature module: ``update`` passes the images to it unchanged (with
``normalize=True`` they stay float), it returns [N, d]; ``num_features`` saves a probe pass; the metric's
result takes the features' dtype, so the wrappers here return float64. torch-fidelity is only needed for the
Inception path.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import diffrt

IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REFERENCE_FILE = "reference-test.safetensors"  # the 10k test images' metric state, beside the classifier
# Where the shipped classifier lives inside the installed package (diffrt/models/, i.e. runtime/models/ here).
DEFAULT_CLASSIFIER_DIR = Path(diffrt.__file__).resolve().parent / "models" / "fashion-classifier"
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
    """sha256 of the weights and buffers (float32): ties reference statistics to the classifier they need."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


# --------------------------------------------------------------------------------------- adherence


@torch.no_grad()
def predict(images: torch.Tensor, classifier: FashionClassifier | None = None, batch_size: int = 500) -> torch.Tensor:
    """Predicted class per image (int64, CPU)."""
    check_images(images)
    classifier = classifier if classifier is not None else load_classifier()
    classifier.eval()
    return torch.cat([classifier(images[i : i + batch_size]).argmax(dim=1).cpu()
                      for i in range(0, len(images), batch_size)])  # fmt: skip


def adherence(images: torch.Tensor, labels, classifier: FashionClassifier | None = None) -> float:
    """Share of images the classifier assigns to the class they were generated for."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("adherence of an empty set")
    return float((predict(images, classifier) == labels).float().mean())


# ------------------------------------------------------------------------------------ FID and KID


def _batches(images: torch.Tensor, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


def fid_metric(feature: nn.Module):
    """torchmetrics FID over a custom feature module (images stay float: ``normalize=True``)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)


def kid_metric(feature: nn.Module, subsets: int, subset_size: int):
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features in buffer": intended here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        return KernelInceptionDistance(feature=feature, subsets=subsets, subset_size=subset_size,
                                       reset_real_features=False, normalize=True)  # fmt: skip


def frechet_distance(fake, feature: nn.Module, real=None, reference: dict | None = None, batch_size=500) -> float:
    """FID between ``fake`` and either ``real`` images or a stored ``reference`` (see :func:`reference_statistics`)."""
    metric = fid_metric(feature)
    if reference is not None:
        metric.real_features_sum = reference["fid_sum"].clone()
        metric.real_features_cov_sum = reference["fid_cov_sum"].clone()
        metric.real_features_num_samples = reference["fid_n"].clone()
    elif real is not None:
        for batch in _batches(real, batch_size):
            metric.update(batch, real=True)
    else:
        raise ValueError("give real images or reference statistics")
    for batch in _batches(fake, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())


def kernel_distance(fake, feature: nn.Module, real=None, reference: dict | None = None, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0, batch_size: int = 500) -> tuple[float, float]:  # fmt: skip
    """KID (mean, std over ``subsets`` random subsets); subsets are drawn from a seeded RNG (reproducible).
    ``subset_size`` is capped at the smaller set's size."""
    if reference is not None:
        real_features = [reference["kid_features"].double()]
    elif real is not None:
        real_features = [feature(batch) for batch in _batches(real, batch_size)]
    else:
        raise ValueError("give real images or reference statistics")
    n_real = sum(len(f) for f in real_features)
    metric = kid_metric(feature, subsets, max(2, min(subset_size, n_real, len(fake))))
    metric.real_features.extend(real_features)
    for batch in _batches(fake, batch_size):
        metric.update(batch, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


@torch.no_grad()
def reference_statistics(classifier: FashionClassifier, images: torch.Tensor, kid_rows: int = 5000,
                         seed: int = 0, batch_size: int = 500) -> dict:  # fmt: skip
    """The real side of domain FID/KID: FID's own state after ``update(images, real=True)`` (float64 sums),
    and ``kid_rows`` feature rows (a seeded random subset, float16) for KID."""
    feature = FeatureNet(classifier)
    metric = fid_metric(feature)
    rows = []
    for batch in _batches(images, batch_size):
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
                         "diffrt.bench.quality.reference_statistics")  # fmt: skip
    return reference


def domain_fid(images: torch.Tensor, classifier=None, reference=None) -> float:
    """FID of generated images against the Fashion-MNIST test set, in the classifier's feature space."""
    classifier = classifier if classifier is not None else load_classifier()
    reference = reference if reference is not None else load_reference(classifier=classifier)
    return frechet_distance(images, FeatureNet(classifier), reference=reference)


def domain_kid(images: torch.Tensor, classifier=None, reference=None, subsets=100, subset_size=1000, seed=0):
    """KID (mean, std) of generated images against the test set, in the classifier's feature space."""
    classifier = classifier if classifier is not None else load_classifier()
    reference = reference if reference is not None else load_reference(classifier=classifier)
    return kernel_distance(images, FeatureNet(classifier), reference=reference, subsets=subsets,
                           subset_size=subset_size, seed=seed)  # fmt: skip


# ------------------------------------------------------------------------------------ Inception FID

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception v3 weights


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path, feature: int = 2048, batch_size=100) -> float:
    """Standard FID (Inception v3 pool features) through torchmetrics, for users' own models.

    ``weights_path``: the FID Inception weights file (torch-fidelity's ``weights-inception-2015-12-05-
    6726825d.pth``); it cannot be downloaded here, so it is required. Images: float [N, 3, H, W] in [0, 1].
    """
    if weights_path is None or not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"Inception weights file {weights_path!r} not found: standard FID needs the FID Inception v3 weights "
            f"({INCEPTION_WEIGHTS}, from torch-fidelity's releases); download it elsewhere and pass its path"
        )
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("standard Inception FID needs torch-fidelity: `pip install torch-fidelity`")
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, images in (("real", real), ("fake", fake)):
        if not (isinstance(images, torch.Tensor) and images.is_floating_point() and images.ndim == 4
                and images.shape[1] == 3):  # fmt: skip
            raise ValueError(f"{name} images must be a float tensor [N, 3, H, W] in [0, 1]")
    try:
        metric = FrechetInceptionDistance(
            feature=feature, normalize=True, feature_extractor_weights_path=str(weights_path)
        )
    except (RuntimeError, KeyError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is not a usable FID Inception weights file: {err}") from err
    for batch in _batches(real, batch_size):
        metric.update(batch, real=True)
    for batch in _batches(fake, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())


# ------------------------------------------------------------------------------------ a whole model


@torch.no_grad()
def evaluate_pipeline(pipe, per_class: int = 100, prompts: str = "canonical", seed: int = 0, batch_size: int = 50,
                      classifier=None, reference=None, **call_options) -> dict:  # fmt: skip
    """Generate ``per_class`` images for each class prompt and score them: adherence (overall and per class),
    domain FID and KID. ``prompts``: "canonical" ("an ankle boot", ...) or "held_out" (phrases never captioned).
    ``call_options`` go to the pipeline (steps, sampler, guidance, ...)."""
    from diffrt.train import data

    if prompts not in ("canonical", "held_out"):
        raise ValueError(f"prompts must be 'canonical' or 'held_out', got {prompts!r}")
    classifier = classifier if classifier is not None else load_classifier()
    reference = reference if reference is not None else load_reference(classifier=classifier)
    texts = {k: data.class_prompt(k) if prompts == "canonical" else data.HELD_OUT[k] for k in range(NUM_CLASSES)}
    jobs = [(label, i) for label in range(NUM_CLASSES) for i in range(per_class)]
    images, start_time = [], time.perf_counter()
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        seeds = [seed + label * 1_000_003 + i for label, i in chunk]
        images.append(pipe([texts[label] for label, _ in chunk], seed=seeds, output_type="pt", progress=False,
                           **call_options).float())  # fmt: skip
    generate_s = time.perf_counter() - start_time
    images = torch.cat(images)
    labels = torch.tensor([label for label, _ in jobs])
    predicted = predict(images, classifier)
    per = {data.CLASS_NAMES[k]: float((predicted[labels == k] == k).float().mean()) for k in range(NUM_CLASSES)}
    kid_mean, kid_std = domain_kid(images, classifier, reference)
    return {
        "prompts": prompts, "per_class": per_class, "images": len(images),
        "adherence": float((predicted == labels).float().mean()), "adherence_per_class": per,
        "fid": domain_fid(images, classifier, reference), "kid_mean": kid_mean, "kid_std": kid_std,
        "generate_s": generate_s, "call_options": {k: str(v) for k, v in call_options.items()},
    }  # fmt: skip
