"""Image-quality metrics of the Fashion-MNIST models: prompt adherence and domain FID/KID, plus Inception FID.

A small CNN trained by the project on Fashion-MNIST (``diffrt train classifier``) serves both metrics:

* prompt adherence: the share of images generated for a class prompt that it classifies as that class;
* domain FID / KID: torchmetrics' FrechetInceptionDistance / KernelInceptionDistance with the classifier's
  penultimate layer as the feature network. The real side is the 10k test images, stored as the metric's own
  state (feature sum and sum of outer products, KID feature rows) in a file beside the classifier weights,
  so no dataset is needed at run time. The classifier and that file are the domain's
  (:mod:`diffrt.models.fashion.classifier`, shared with the trainer); their names are re-exported here.

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

import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..models.fashion import captions
from ..models.fashion.classifier import (
    NUM_CLASSES,
    FashionClassifier,
    FeatureNet,
    batches,
    check_images,
    fid_metric,
    load_classifier,
    load_reference,
)

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
        for batch in batches(real, batch_size):
            metric.update(batch, real=True)
    else:
        raise ValueError("give real images or reference statistics")
    for batch in batches(fake, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())


def kernel_distance(fake, feature: nn.Module, real=None, reference: dict | None = None, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0, batch_size: int = 500) -> tuple[float, float]:  # fmt: skip
    """KID (mean, std over ``subsets`` random subsets); subsets are drawn from a seeded RNG (reproducible).
    ``subset_size`` is capped at the smaller set's size."""
    if reference is not None:
        real_features = [reference["kid_features"].double()]
    elif real is not None:
        real_features = [feature(batch) for batch in batches(real, batch_size)]
    else:
        raise ValueError("give real images or reference statistics")
    n_real = sum(len(f) for f in real_features)
    metric = kid_metric(feature, subsets, max(2, min(subset_size, n_real, len(fake))))
    metric.real_features.extend(real_features)
    for batch in batches(fake, batch_size):
        metric.update(batch, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


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
    for batch in batches(real, batch_size):
        metric.update(batch, real=True)
    for batch in batches(fake, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())


# ------------------------------------------------------------------------------------ a whole model


def sample_plan(per_class: int, prompts: str = "canonical", seed: int = 0) -> list[tuple[int, int, str, int]]:
    """(label, index in its class, prompt, seed) of every image a quality run generates, in order.
    ``prompts``: "canonical" ("an ankle boot", ...) or "held_out" (phrases never captioned)."""
    if prompts not in ("canonical", "held_out"):
        raise ValueError(f"prompts must be 'canonical' or 'held_out', got {prompts!r}")
    texts = {k: captions.class_prompt(k) if prompts == "canonical" else captions.HELD_OUT[k]
             for k in range(NUM_CLASSES)}  # fmt: skip
    return [(label, i, texts[label], seed + label * 1_000_003 + i) for label in range(NUM_CLASSES)
            for i in range(per_class)]  # fmt: skip


@torch.no_grad()
def score(images: torch.Tensor, labels: torch.Tensor, classifier=None, reference=None) -> dict:
    """Adherence (overall and per class), domain FID and KID of images [N, 3, H, W] in [0, 1] made for ``labels``."""
    classifier = classifier if classifier is not None else load_classifier()
    reference = reference if reference is not None else load_reference(classifier=classifier)
    predicted = predict(images, classifier)
    per = {captions.CLASS_NAMES[k]: float((predicted[labels == k] == k).float().mean()) for k in range(NUM_CLASSES)}
    kid_mean, kid_std = domain_kid(images, classifier, reference)
    return {
        "images": len(images), "adherence": float((predicted == labels).float().mean()), "adherence_per_class": per,
        "fid": domain_fid(images, classifier, reference), "kid_mean": kid_mean, "kid_std": kid_std,
    }  # fmt: skip


@torch.no_grad()
def evaluate_pipeline(pipe, per_class: int = 100, prompts: str = "canonical", seed: int = 0, batch_size: int = 50,
                      classifier=None, reference=None, controls=None, **call_options) -> dict:  # fmt: skip
    """Generate ``per_class`` images for each class prompt and score them: adherence (overall and per class),
    domain FID and KID. ``prompts``: "canonical" ("an ankle boot", ...) or "held_out" (phrases never captioned).
    ``controls``: with a ControlNet loaded, per class the control pictures [per_class, 3, H, W] of its images.
    ``call_options`` go to the pipeline (steps, sampler, guidance, ...)."""
    plan = sample_plan(per_class, prompts, seed)  # a bad prompts= fails before the classifier loads
    classifier = classifier if classifier is not None else load_classifier()
    reference = reference if reference is not None else load_reference(classifier=classifier)
    images, start_time = [], time.perf_counter()
    for start in range(0, len(plan), batch_size):
        chunk = plan[start : start + batch_size]
        control = {} if controls is None else {"control_image": torch.stack([controls[label][i] for label, i, _, _ in
                                                                             chunk])}  # fmt: skip
        images.append(pipe([text for _, _, text, _ in chunk], seed=[s for *_, s in chunk], output_type="pt",
                           progress=False, **control, **call_options).float())  # fmt: skip
    generate_s = time.perf_counter() - start_time
    labels = torch.tensor([label for label, *_ in plan])
    return {
        "prompts": prompts, "per_class": per_class, **score(torch.cat(images), labels, classifier, reference),
        "generate_s": generate_s, "call_options": {k: str(v) for k, v in call_options.items()},
    }  # fmt: skip
