"""SHA-256 sums of the weights that ship inside the package, checked when they load.

Each shipped model folder holds ``checksums.json``: every ``*.safetensors`` file under it (relative path) with
its SHA-256. A flipped byte in a weight file would otherwise give a different image with no error; now it is
refused, naming the file. Hashing is done once per process per file version: results are kept by path, size
and modification time, so loading the same model again costs nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .files import atomic_write_json, read_json_object

MANIFEST = "checksums.json"
_CHUNK = 1 << 20
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already computed


def sha256(path: Path) -> str:
    """The file's SHA-256, computed once per process per (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
        _verified[key] = digest.hexdigest()
    return _verified[key]


def weight_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))


def write(folder: str | os.PathLike) -> Path:
    """Write ``checksums.json`` for every safetensors file under ``folder``."""
    folder = Path(folder)
    sums = {name: sha256(folder / name) for name in weight_files(folder)}
    atomic_write_json(folder / MANIFEST, {"sha256": sums})
    return folder / MANIFEST


def verify(folder: str | os.PathLike) -> None:
    """Refuse a shipped folder whose weight files are missing, added or changed against its checksums.json."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: its weights cannot be checked; reinstall diffrt")
    sums = read_json_object(manifest, "a JSON object with 'sha256': {file: sum}").get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise ValueError(f"{manifest} must hold {{'sha256': {{file: hex digest}}}}")
    found = weight_files(folder)
    if sorted(sums) != found:
        raise ValueError(f"{folder}: weight files {found} do not match those in {MANIFEST} ({sorted(sums)}); "
                         "reinstall diffrt")  # fmt: skip
    for name, expected in sums.items():
        if sha256(folder / name) != expected:
            raise ValueError(f"{folder / name} is damaged or was changed: its SHA-256 differs from the one in "
                             f"{MANIFEST}; reinstall diffrt (or re-ship the model)")  # fmt: skip
