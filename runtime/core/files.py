"""Writing files and folders so that a reader never sees half of one: temporary name, flush, rename.

Used for every artifact diffrt writes: result files, manifests, exported graphs, engines, shipped models;
:func:`check_output`, which every command runs on where its outputs go before it starts the work; and
:func:`read_json_object`, the one reader of the small JSON files diffrt and diffusers folders hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # every temporary name diffrt writes: TEMP_PREFIX + the writer's pid + "-" + a name


def temp_prefix(name: str = "") -> str:
    """The start of a temporary name this process writes (its pid in it, so a cleaner knows whose it is)."""
    return f"{TEMP_PREFIX}{os.getpid()}-{name}"


def clean_leftovers(folder: str | os.PathLike) -> int:
    """Remove the temporaries a killed writer left in ``folder`` (those of a process that no longer runs, or of
    no recorded process); returns how many. Safe beside live writers: their pids are alive."""
    removed = 0
    for entry in Path(folder).glob(TEMP_PREFIX + "*"):
        owner = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and _alive(int(owner)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def safetensors_file(path, folder_file: str, what: str) -> Path:
    """The safetensors file of ``what`` given as a file or as a folder holding ``folder_file``; pickle files
    are refused (diffrt never unpickles)."""
    path = Path(path)
    if path.is_dir():
        path = path / folder_file
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path} is a pickle file ({path.suffix}): diffrt never unpickles; convert it to "
                         ".safetensors (safetensors.torch.save_file) and load that")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path} (a .safetensors file, or a folder holding {folder_file})")
    return path


def read_json_object(path: str | os.PathLike, holds: str = "a JSON object") -> dict:
    """The JSON object in ``path``; a ValueError naming the file when it is not JSON or not an object.
    ``holds`` says what the object is, for that message."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold {holds}, got a {type(value).__name__}")
    return value


def check_output(path: str | os.PathLike, what: str, *, folder: bool = False, new: bool = False) -> Path:
    """Fail now, not after the work, when ``path`` could not be written: a ValueError naming the path and
    why. ``folder``: the output is a folder (else a file); ``new``: it must not exist yet. Nothing is created:
    a probe file is made and removed in the nearest folder that exists (file modes alone do not tell, e.g.
    for root, on a read-only mount or under /proc)."""
    path = Path(path)
    if path.exists():
        if new and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{what} {path} already exists: give a new path, or remove it first")
        if folder and not path.is_dir():
            raise ValueError(f"{what} {path} is a file, not a folder")
        if not folder and path.is_dir():
            raise ValueError(f"{what} {path} is a folder: give a file name")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise ValueError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    probe_in = existing if existing.is_dir() else existing.parent
    try:
        fd, probe = tempfile.mkstemp(dir=probe_in, prefix=temp_prefix("probe-"))
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"cannot write {what} {path}: {probe_in} is not writable ({err.strerror})") from None
    return path


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: the path(s) and the reason, without errno numbers."""
    if err.filename is None:
        return str(err)
    names = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
    return f"{names}: {err.strerror or type(err).__name__}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name + "."))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, payload, *, sort_keys: bool = True) -> None:
    """JSON (indented, NaN refused) written atomically; serialised first, so a bad value touches no file."""
    text = json.dumps(payload, indent=2, sort_keys=sort_keys, default=str, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def make_readable(top: str | os.PathLike) -> None:
    """Give a tree the umask's usual modes: mkdtemp makes 0700 folders and safetensors writes 0600 files,
    which other users of a shared folder could not read."""
    mask = _umask()
    top = Path(top)
    for path in [top, *top.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_folder(dest: str | os.PathLike, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Build a folder in a temporary sibling with ``write(tmp)`` and rename it into place, so a failure
    leaves no half-written folder; ``replace`` swaps out an existing one, else it is an error."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(tmp)
        make_readable(tmp)
        if dest.exists():
            if not replace:
                raise FileExistsError(f"{dest} already exists")
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
