"""Training of the embedded Fashion-MNIST models: VAE, eps / flow / LCM U-Nets and the metrics classifier.

``diffrt train vae|fashion|fashion-flow|fashion-lcm|classifier --out DIR`` (see :mod:`diffrt.cli.train`)
reproduces each model from Debian's ``dataset-fashion-mnist`` with the seeds and settings recorded in the
folder's ``train.json``. Training runs on CUDA when present, else on the CPU. Names load lazily, so the
command line builds its help without importing torch.
"""

from ..core.lazy import lazy_attributes

_NAMES = {
    "ClassifierSettings": ".classifier", "train_classifier": ".classifier",
    "TrainResult": ".common", "TrainSettings": ".common",
    "DiffusionSettings": ".diffusion", "train_diffusion": ".diffusion", "train_eps": ".diffusion",
    "train_flow": ".diffusion",
    "LCMSettings": ".lcm", "train_lcm": ".lcm",
    "VAESettings": ".vae", "train_vae": ".vae",
}  # fmt: skip
__all__ = sorted(_NAMES)

__getattr__ = lazy_attributes(__name__, _NAMES)
