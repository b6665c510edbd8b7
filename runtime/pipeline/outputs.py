"""Where ``diffrt generate`` writes its images, decided and checked before any work.

``-o`` takes three forms: a file with an image extension (one image, or a grid of all of them), a folder
(ends with ``/`` or exists: ``image_000000_seed42.png`` ...), or a pattern with ``{i}`` and/or ``{seed}``
(``shots/{seed}.jpg``). Folder and pattern outputs are written as each batch finishes, so memory stays that of
one batch; a grid holds every image until the end, so it is capped at ``MAX_GRID`` images.
"""

from __future__ import annotations

import functools
import io
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path

from ..core.files import atomic_write_bytes, check_output

MAX_GRID = 64  # images in one grid file: beyond this, write a folder or a pattern
FOLDER_NAMES = "image_{i:06d}_seed{seed}.png"
FIELDS = ("i", "seed")


@functools.cache
def image_formats() -> dict[str, str]:
    """File extension -> PIL format, for the formats PIL can write."""
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


@dataclass(frozen=True)
class Output:
    pattern: str  # a str.format pattern over i and seed; a plain file name for a grid
    grid: bool

    def path(self, i: int, seed: int) -> Path:
        return Path(self.pattern.format(i=i, seed=seed))

    def describe(self, n: int) -> str:
        if self.grid:
            return f"{self.pattern} ({'a grid of ' if n > 1 else ''}{n} image{'s' if n > 1 else ''})"
        return f"{n} image{'s' if n > 1 else ''} as {self.pattern}"


def plan(out: str, n: int) -> Output:
    """The output for ``n`` images at ``out`` (see the module docstring), checked writable; a ValueError
    naming ``out`` and what is allowed otherwise."""
    if "{" in out or "}" in out:
        output = Output(_check_pattern(out, n), grid=False)
        check_output(output.path(0, 0).parent, "-o folder", folder=True)
    elif out.endswith(("/", os.sep)) or Path(out).is_dir():
        output = Output(str(Path(out) / FOLDER_NAMES), grid=False)
        check_output(out, "-o folder", folder=True)
    else:
        _image_format(out)
        if n > MAX_GRID:
            stem = Path(out).stem
            raise ValueError(f"-n {n} is too many images for one grid file -o {out} (at most {MAX_GRID}): give a "
                             f"folder (-o {stem}/) or a pattern (-o '{stem}_{{i}}.png')")  # fmt: skip
        output = Output(out, grid=True)
        check_output(out, "-o")
    return output


def _check_pattern(pattern: str, n: int) -> str:
    names = [name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None]
    if not names or any(name not in FIELDS for name in names):
        raise ValueError(f"-o pattern {pattern!r} may use only {{i}} (image index) and {{seed}}, got "
                         f"{', '.join(repr(n) for n in names) or 'no field'}")  # fmt: skip
    try:
        first, second = pattern.format(i=0, seed=0), pattern.format(i=1, seed=1)
    except (ValueError, IndexError) as err:
        raise ValueError(f"-o pattern {pattern!r} is not a valid format: {err}") from None
    if n > 1 and first == second:
        raise ValueError(f"-o pattern {pattern!r} gives every image the same name: use {{i}} or {{seed}}")
    _image_format(first)
    return pattern


def _image_format(path: str) -> str:
    formats = image_formats()
    suffix = Path(path).suffix.lower()
    if suffix not in formats:
        usual = ", ".join(ext for ext in (".png", ".jpg", ".webp", ".bmp", ".tiff") if ext in formats)
        what = f"extension {suffix!r}" if suffix else "no file extension"
        raise ValueError(f"-o {path} has {what}: give an image file ({usual}, ...), a folder ending in /, or a "
                         f"pattern such as out_{{i}}.png")  # fmt: skip
    return formats[suffix]


def write(image, path: str | os.PathLike) -> None:
    """One PIL image to ``path`` in the format its extension names, atomically (no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode(image, _image_format(str(path))))


def encode(image, image_format: str = "PNG") -> bytes:
    """One PIL image as the bytes of an image file: what ``write`` stores and ``diffrt serve`` sends."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format)
    return buffer.getvalue()


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of a grid of ``n`` images: as square as can be with no empty row (8 -> 2 x 4)."""
    rows = max(1, math.isqrt(n))
    return rows, math.ceil(n / rows)


def image_grid(images):
    """Tile PIL images into one grid (see :func:`grid_shape`)."""
    from PIL import Image

    rows, cols = grid_shape(len(images))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid
