"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, and the caption sampler of the trainers.

The images are the four gzip IDX files (60k train + 10k test, 28x28 grayscale, 10 classes, MIT licence),
kept as uint8 padded to 32x32 (zero padding: the background is black) and turned into float model input per
batch: 3 channels in [-1, 1] for the VAE, [0, 1] for the classifier and the quality metrics.

Captions: several phrasings and synonyms per class (the table is :mod:`diffrt.models.fashion.captions`, shared with
the quality benchmarks; its names are re-exported here).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.fashion.captions import (  # noqa: F401  (the caption names, re-exported for the trainers)
    CLASS_NAMES,
    EMPTY_CAPTION,
    HELD_OUT,
    NOUNS,
    P_EMPTY,
    TEMPLATES,
    caption_table,
    class_captions,
    class_prompt,
)

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "DIFFRT_FASHION_MNIST"  # overrides DEFAULT_DIR: a folder with the four gzip IDX files
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SIZES = {"train": 60000, "test": 10000}
IMAGE_SIZE = 28
PADDED_SIZE = 32
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned byte data, 3 and 1 dimensions

class CaptionSampler:
    """Draws a caption index per label: ``p_empty`` of them the empty caption, the rest uniform over the
    class's phrasings. All randomness comes from the caller's generator, so runs are reproducible."""

    def __init__(self, per_class: list[list[int]], p_empty: float = P_EMPTY, empty_index: int = 0):
        if not 0 <= p_empty < 1:
            raise ValueError(f"p_empty must be in [0, 1), got {p_empty}")
        if not per_class or any(not ids for ids in per_class):
            raise ValueError("every class needs at least one caption")
        width = max(len(ids) for ids in per_class)
        # a rectangular [classes, width] table; draws stay below each class's own count, so padding is never drawn
        self.table = torch.tensor([[ids[k % len(ids)] for k in range(width)] for ids in per_class])
        self.counts = torch.tensor([len(ids) for ids in per_class])
        self.p_empty, self.empty_index = p_empty, empty_index

    def __call__(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        labels = labels.cpu().long()
        u = torch.rand(labels.shape, generator=generator)
        pick = (torch.rand(labels.shape, generator=generator) * self.counts[labels]).long()
        ids = self.table[labels, pick]
        return torch.where(u < self.p_empty, torch.full_like(ids, self.empty_index), ids)


# ------------------------------------------------------------------------------------------ IDX files


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of the IDX files: ``root``, else $DIFFRT_FASHION_MNIST, else Debian's install location."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def dataset_available(root=None) -> bool:
    folder = data_dir(root)
    return all((folder / name).is_file() for names in FILES.values() for name in names)


def _require_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found; {INSTALL_HINT}, or set ${ENV_DIR} to a folder holding "
            f"{', '.join(n for names in FILES.values() for n in names)}"
        )
    return path


def read_idx(path: str | os.PathLike, magic: int, item_shape: tuple[int, ...], limit: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzip): check its magic number and dimensions, return [N, *item_shape].

    Without ``limit`` the whole file is read and its length must match its header exactly; with it, only the
    first ``limit`` items are read (the header must still promise at least that many).
    """
    path = Path(path)
    ndim = 1 + len(item_shape)
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim:
                raise ValueError(f"{path} is corrupt: its header is truncated")
            found = int.from_bytes(header[:4], "big")
            if found != magic:
                raise ValueError(
                    f"{path} is corrupt or not an IDX file: magic number {found:#010x}, expected {magic:#010x}"
                )
            dims = [int.from_bytes(header[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
            if tuple(dims[1:]) != tuple(item_shape):
                raise ValueError(f"{path}: items are {tuple(dims[1:])}, expected {tuple(item_shape)}")
            count = dims[0] if limit is None else min(limit, dims[0])
            item = int(np.prod(item_shape, dtype=np.int64))
            data = f.read(count * item)
            if len(data) != count * item:
                raise ValueError(f"{path} is corrupt: truncated after {len(data) // item} of {dims[0]} items")
            if limit is None and f.read(1):
                raise ValueError(f"{path} is corrupt: data continues past the {dims[0]} items its header lists")
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is corrupt (gzip: {err})") from err
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *item_shape)


@dataclass
class Split:
    """One split: ``images`` uint8 [N, 32, 32] (zero-padded), ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


def load_split(split: str = "train", root=None, limit: int | None = None) -> Split:
    """Read a split; ``limit`` keeps the first N images (smoke runs). Errors name the file and the fix."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    folder = data_dir(root)
    image_file, label_file = (_require_file(folder, name) for name in FILES[split])
    images = read_idx(image_file, _IMAGES_MAGIC, (IMAGE_SIZE, IMAGE_SIZE), limit)
    labels = read_idx(label_file, _LABELS_MAGIC, (), limit)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    if limit is None and len(labels) != SIZES[split]:
        raise ValueError(f"{image_file}: {len(labels)} items, Fashion-MNIST's {split} split has {SIZES[split]}")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{label_file} is corrupt: label {int(labels.max())} is not a class (0..9)")
    return Split(pad_images(torch.from_numpy(images.copy())), torch.from_numpy(labels.astype(np.int64)))


def pad_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> [N, 32, 32], 2 black pixels on each side (the U-Net and VAE halve 32 twice)."""
    pad = (PADDED_SIZE - IMAGE_SIZE) // 2
    return torch.nn.functional.pad(images, (pad, pad, pad, pad))


def to_model_input(images: torch.Tensor, device=None) -> torch.Tensor:
    """uint8 [N, 32, 32] -> float32 [N, 3, 32, 32] in [-1, 1] (the VAE's input range)."""
    x = images.to(device).float().div(127.5).sub(1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def to_unit(images: torch.Tensor, device=None) -> torch.Tensor:
    """uint8 [N, 32, 32] -> float32 [N, 3, 32, 32] in [0, 1] (what pipelines return with output_type="pt")."""
    x = images.to(device).float().div(255.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
