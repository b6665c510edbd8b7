"""Exported artifacts (ONNX graphs, TensorRT engines): where they are cached, what identifies them, and the
checks before any of them is loaded.

A folder of artifacts holds one file per graph and ``manifest.json``: its kind ("onnx" or "tensorrt"), the
key of the settings it was made with, the model it was made from and, per graph, each file's SHA-256 and size.
Writers (:mod:`diffrt.export`) write every file to a temporary name and rename it into place while holding the
folder's lock, so readers never see half a file; readers (the onnxruntime and tensorrt backends) take a folder
only through :func:`open_folder`, which refuses a missing, truncated or replaced file. The backends get their
folders from an artifact source they build themselves (:mod:`diffrt.export.sources`, or a deployed folder's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..core.checks import fields
from ..core.files import clean_leftovers, temp_prefix
from ..core.fingerprint import weights_digest
from ..core.version import __version__

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when the export code changes what it writes: old cache entries stop matching
MANIFEST = "manifest.json"
LOCK = ".lock"
KINDS = ("onnx", "tensorrt")
_CHUNK = 1 << 22


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, or not what its manifest says."""


def default_cache_dir() -> Path:
    """``$DIFFRT_CACHE`` when set, else ``~/.cache/diffrt``."""
    return Path(os.environ.get("DIFFRT_CACHE") or Path.home() / ".cache" / "diffrt").expanduser()


def resolve_cache_dir(cache_dir) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def safe_name(name: str) -> str:
    """A model name usable in a cache path."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "model"


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


# loader bookkeeping, not the architecture ("architectures" is set by save_pretrained; the class is hashed)
_CONFIG_SKIP = {"transformers_version", "dtype", "torch_dtype", "architectures"}


def _config_dict(module) -> dict:
    config = module.config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # keys with a leading underscore are file bookkeeping (_name_or_path, _diffusers_version, ...)
    return {k: v for k, v in raw.items() if not k.startswith("_") and k not in _CONFIG_SKIP}


def _graph_sources(components) -> dict:
    modules = {components.denoiser_name: components.denoiser, "vae": components.vae}
    modules.update({f"text_encoder_{i}": m for i, m in enumerate(components.text_encoders)})
    modules.update({f"controlnet_{i}": m for i, m in enumerate(components.controlnets)})
    return modules


def architecture(components) -> dict:
    """The family and each graph module's class and config: what compiled code depends on (not the weights)."""
    return {"family": components.family,
            "modules": {label: [type(m).__name__, _config_dict(m)] for label, m in _graph_sources(components).items()}}


def model_hash(components) -> str:
    """What an export is made from: the architecture and the weights fingerprint (:mod:`diffrt.core.fingerprint`).
    Paths play no part: the same weights loaded from two folders, or in two float dtypes, hash the same."""
    return key_hash({"format": EXPORT_FORMAT, **architecture(components),
                     "weights": weights_digest(_graph_sources(components))})  # fmt: skip


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (absent ones as "none"), plus diffrt's and the export format."""
    from ..core.results import package_version

    found = {"diffrt": __version__, "export_format": str(EXPORT_FORMAT)}
    found.update({name: package_version(name) or "none" for name in names})
    return found


# ------------------------------------------------------------------------------------ writing helpers
def move_into_place(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a finished file (written in a scratch folder of the same folder tree) over ``target``."""
    with open(source, "rb") as f:
        os.fsync(f.fileno())
    os.replace(source, target)


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A temporary folder inside ``parent`` (same file system, so renames out of it are atomic)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=temp_prefix()))
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
        clean_leftovers(folder)
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


FILE_RECORD = {"file": str, "sha256": str, "bytes": int}
# "key" (the cache's) is absent from folders written by hand or by older exports: readers that need it ask for it
MANIFEST_FIELDS = {"kind": str, "key": (str, type(None)), "precision": str, "model": dict, "graphs": dict}


def checked_fields(record, spec: dict, where: str) -> dict:
    """:func:`diffrt.core.checks.fields` for a record on disk: a malformed one is an ArtifactError."""
    try:
        return fields(record, spec, where)
    except ValueError as err:
        raise ArtifactError(str(err)) from None


def check_manifest(manifest: dict, kind: str, where) -> None:
    """A manifest's fields that readers use, each of its JSON type, with the file and the field named; a file
    record's name a plain name in the folder (no path that leaves it)."""
    checked_fields(manifest, MANIFEST_FIELDS, str(where))
    checked_fields(manifest["model"], {"hash": str, "name": (str, type(None))}, f"{where}: model")
    for graph, record in manifest["graphs"].items():
        checked_fields(record, {"engine": dict} if kind == "tensorrt" else {"onnx": dict, "data": (dict, type(None))},
                       f"{where}: graphs.{graph}")  # fmt: skip
        for name in ("engine", "onnx", "data"):
            file = record.get(name)
            if file is not None:
                checked_fields(file, FILE_RECORD, f"{where}: graphs.{graph}.{name}")
                if Path(file["file"]).name != file["file"]:
                    raise ArtifactError(f"{where}: graphs.{graph}.{name}.file {file['file']!r} is not a file name")


def valid_manifest(folder, kind: str) -> dict | None:
    """The folder's manifest of ``kind`` with every field a reader uses well-formed, or None (a warning says
    what is wrong): a writer then starts a fresh one."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("kind") != kind:
        return None
    try:
        check_manifest(manifest, kind, Path(folder) / MANIFEST)
    except ArtifactError as err:
        log.warning("ignoring a malformed manifest: %s", err)
        return None
    return manifest


def file_record(path: Path) -> dict:
    return {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def record_files(kind: str, record: dict) -> list[dict]:
    """The file records of one graph's entry: an ONNX file (and its external data), or an engine."""
    if kind == "tensorrt":
        return [record["engine"]]
    return [record["onnx"], *([record["data"]] if record.get("data") else [])]


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


def verify_graph(folder: Path, kind: str, record: dict) -> str | None:
    return verify_files(folder, record_files(kind, record))


_WHAT = {"onnx": ("a diffrt ONNX export", "exported", "graph"), "tensorrt": ("a diffrt TensorRT build", "built",
                                                                             "engine")}  # fmt: skip


def open_folder(folder, kind: str, graphs: list[str] | None = None, model_hash: str | None = None) -> dict:
    """Read and verify an artifact folder before anything in it is loaded: it must have a manifest of
    ``kind``, be made from the model ``model_hash`` when given, hold ``graphs`` (default: all it lists), and
    each of their files must match its size and SHA-256. Returns the manifest."""
    if kind not in KINDS:
        raise ValueError(f"artifact kind must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    what, made, unit = _WHAT[kind]
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format") != EXPORT_FORMAT or manifest.get("kind") != kind:
        raise ArtifactError(f"{folder} is not {what} (no valid {MANIFEST})")
    check_manifest(manifest, kind, folder / MANIFEST)
    if model_hash is not None and manifest["model"]["hash"] != model_hash:
        raise ArtifactError(
            f"{folder} was {made} from other weights (model hash {manifest['model']['hash'][:16]}), not from this "
            f"model ({model_hash[:16]})"
        )
    for graph in graphs or list(manifest["graphs"]):
        record = manifest["graphs"].get(graph)
        if record is None:
            raise ArtifactError(f"{folder} has no {graph!r} {unit}; it has {sorted(manifest['graphs'])}")
        problem = verify_graph(folder, kind, record)
        if problem:
            raise ArtifactError(f"refusing to load the {graph!r} {unit}: {problem}")
    return manifest
