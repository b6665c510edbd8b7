"""Training of the embedded Fashion-MNIST models: VAE, eps / flow / LCM U-Nets and the metrics classifier.

``diffrt train vae|fashion|fashion-flow|fashion-lcm|classifier --out DIR`` (see :mod:`diffrt.train.cli`)
reproduces each model from Debian's ``dataset-fashion-mnist`` with the seeds and settings recorded in the
folder's ``train.json``. Training runs on CUDA when present, else on the CPU.
"""

from .classifier import ClassifierSettings, train_classifier
from .common import TrainResult, TrainSettings
from .diffusion import DiffusionSettings, train_diffusion, train_eps, train_flow
from .lcm import LCMSettings, train_lcm
from .vae import VAESettings, train_vae

__all__ = [
    "ClassifierSettings", "DiffusionSettings", "LCMSettings", "TrainResult", "TrainSettings", "VAESettings",
    "train_classifier", "train_diffusion", "train_eps", "train_flow", "train_lcm", "train_vae",
]  # fmt: skip
