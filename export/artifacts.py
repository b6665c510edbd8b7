"""Hashes, cache keys, atomic writes and locks for exported artifacts (ONNX files, engines, manifests).

Every artifact is written to a temporary name in its final folder and renamed into place, so a reader never
sees half a file; writers of one folder hold its lock, so two processes exporting the same model take
turns and the second finds the first one's artifacts. Each artifact's SHA-256 is recorded in the folder's
``manifest.json`` and checked before the artifact is used: a corrupt or truncated file is never loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when the export code changes what it writes: old cache entries stop matching
MANIFEST = "manifest.json"
LOCK = ".lock"
_TEMP_PREFIX = ".tmp-"
_CHUNK = 1 << 22


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, or not what its manifest says."""


def default_cache_dir() -> Path:
    """``$DIFFRT_CACHE`` when set, else ``~/.cache/diffrt``."""
    return Path(os.environ.get("DIFFRT_CACHE") or Path.home() / ".cache" / "diffrt").expanduser()


def resolve_cache_dir(cache_dir) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


# --------------------------------------------------------------------------------------------- hashing
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def key_hash(payload) -> str:
    """A stable hash of JSON-able ``payload`` (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def model_hash(components) -> str:
    """SHA-256 over the graphs' weights (names, dtypes, shapes, bytes) and configs; paths play no part,
    so the same weights loaded from two folders hash the same."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": EXPORT_FORMAT, "family": components.family}).encode())
    modules = [("unet", components.unet), ("vae", components.vae)]
    modules += [(f"text_encoder_{i}", m) for i, m in enumerate(components.text_encoders)]
    for label, module in modules:
        h.update(f"{label}|{type(module).__name__}".encode())
        h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
        for name, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            h.update(_tensor_bytes(tensor))
    return h.hexdigest()


# loader bookkeeping, not the architecture ("architectures" is set by save_pretrained; the class is hashed)
_CONFIG_SKIP = {"transformers_version", "dtype", "torch_dtype", "architectures"}


def _config_dict(module) -> dict:
    config = module.config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # keys with a leading underscore are file bookkeeping (_name_or_path, _diffusers_version, ...)
    return {k: v for k, v in raw.items() if not k.startswith("_") and k not in _CONFIG_SKIP}


def _tensor_bytes(tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (absent ones as "none"), plus diffrt's and the export format."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    found = {"diffrt": __version__, "export_format": str(EXPORT_FORMAT)}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "none"
    return found


# ------------------------------------------------------------------------------------ atomic writes
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX + path.name + ".")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, payload) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def move_into_place(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a finished file (written in a scratch folder of the same folder tree) over ``target``."""
    with open(source, "rb") as f:
        os.fsync(f.fileno())
    os.replace(source, target)


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A temporary folder inside ``parent`` (same file system, so renames out of it are atomic)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=_TEMP_PREFIX))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def locked(folder: Path, what: str, timeout: float = 6 * 3600) -> Iterator[None]:
    """Hold ``folder``'s lock (an OS file lock: released when the process dies, so never stale).
    Leftover temporaries of a killed writer are removed once the lock is held."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process that is writing %s in %s", what, folder)
        start = time.monotonic()
        try:
            lock.acquire(timeout=timeout)
        except Timeout as err:
            raise TimeoutError(f"gave up waiting {timeout:.0f} s for the lock on {folder}") from err
        log.info("lock on %s acquired after %.1f s", folder, time.monotonic() - start)
    try:
        for leftover in folder.glob(_TEMP_PREFIX + "*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------- manifests
def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when it has none or an unreadable one (treated as no export)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable %s: %s", path, err)
        return None
    return manifest if isinstance(manifest, dict) else None


def file_record(path: Path) -> dict:
    return {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def verify_files(folder: Path, records: list[dict]) -> str | None:
    """None when every recorded file exists with its size and SHA-256, else what is wrong."""
    for record in records:
        path = folder / record["file"]
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{path} has {size} bytes, its manifest says {record['bytes']} (truncated or replaced)"
        if file_sha256(path) != record["sha256"]:
            return f"{path} does not match the SHA-256 in its manifest (corrupt or replaced)"
    return None
