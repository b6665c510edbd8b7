"""``diffrt batch``: images for every row of a prompts file on Ray Data, resumable.

Each row (a prompt, its seed and settings) becomes one PNG in the output folder and one line of its
``manifest.jsonl`` (row, file, prompt, seed, settings, SHA-256 of the PNG). Rows run in pipeline calls of up to
``batch_size`` images on ``workers`` Ray actors, each holding one loaded pipeline.

Nothing is lost or done twice when something dies:
- a PNG is written to a temporary name and renamed, so a file is whole or absent;
- only the driver appends to the manifest, after a batch's files are in place, a line per row, flushed and
  synced; the next run first rewrites it (atomically) without lines cut short by a kill or whose file is
  damaged, and redoes those rows;
- a killed worker's batch is retried by Ray Data on a restarted actor (its finished files are rewritten with the
  same bytes, and its rows reach the manifest once, when the retry returns);
- a rerun reads the manifest and skips every row whose entry is there with its file intact (same hash).

Rows are known by the hash of their prompt, seed and settings, so editing the prompts file redoes only what
changed. In a ``.txt`` file each non-empty line is a prompt with seed ``seed + k`` for the k-th prompt; a
``.jsonl`` line is an object with ``prompt`` and any of ``seed``, ``steps``, ``sampler``, ``guidance``,
``negative_prompt``, ``width``, ``height``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.files import atomic_write_bytes
from ..pipeline.outputs import encode
from . import protocol
from .resources import cpu_share, torch_threads
from .worker import start_pipeline, startup_error

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
ROW_OPTIONS = ("steps", "sampler", "guidance", "negative_prompt", "width", "height")  # besides prompt and seed


@dataclass(frozen=True)
class BatchSettings:
    model: str
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    workers: int = 1
    batch_size: int = 4  # images per pipeline call
    worker_cpus: float | None = None  # CPUs (and torch threads) per worker on a CPU cluster; default: CPUs / workers

    def check(self) -> None:
        for name in ("workers", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.worker_cpus is not None and not self.worker_cpus > 0:
            raise ValueError(f"worker_cpus must be > 0, got {self.worker_cpus!r}")


# ---------------------------------------------------------------------------------------------------- rows
def read_rows(path: str | os.PathLike, model: str, seed: int = 0) -> list[dict]:
    """The rows of a ``.txt`` or ``.jsonl`` prompts file, each with its ``row`` number, ``id`` (the hash of the
    row and the model's name: another model redoes every row) and ``file``."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: a prompts file is .txt (a prompt per line) or .jsonl (an object per line), "
                         f"not {path.suffix or 'a file without extension'}")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = [(number, line.strip()) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line]
    if not lines:
        raise ValueError(f"{path} holds no prompt")
    rows, seen = [], {}
    for index, (number, line) in enumerate(lines):
        row = _jsonl_row(path, number, line) if path.suffix == ".jsonl" else {"prompt": line}
        row.setdefault("seed", seed + index)
        key = json.dumps({**row, "model": model}, sort_keys=True)
        seen[key] = seen.get(key, 0) + 1  # an identical row again is a row of its own: its own image and id
        key += "" if seen[key] == 1 else f"#{seen[key]}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        rows.append({**row, "row": index, "id": digest, "file": f"{index:06d}_{digest[:10]}.png"})
    return rows


def _jsonl_row(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{path}:{number}: not JSON ({err})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{number}: a line must be a JSON object, got {type(row).__name__}")
    try:  # the JSON types only: the pipeline judges the values, and a worker reports the rows it refuses
        protocol.check_record(row, ("prompt", "seed", *ROW_OPTIONS))
    except protocol.BadRequest as err:
        raise ValueError(f"{path}:{number}: {err}") from None
    if row.get("prompt") is None:
        raise ValueError(f"{path}:{number}: a row needs a prompt")
    return {key: value for key, value in row.items() if value is not None}


def call_options(row: dict) -> dict:
    """The pipeline options of a row, besides its prompt and seed."""
    return {key: row[key] for key in ROW_OPTIONS if key in row}


# ---------------------------------------------------------------------------------------------- manifest
def finished(out: Path) -> dict[str, dict]:
    """Manifest entries whose file is there with the recorded hash, by row id, the first of each id kept."""
    manifest = out / MANIFEST
    if not manifest.exists():
        return {}
    done = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut short by a kill: its row is redone
        if not _is_entry(entry):
            log.warning("%s: ignoring a line that is not a manifest entry: %.80s", manifest, line)
            continue
        file = out / entry["file"]
        if entry.get("id") not in done and file.is_file() and _sha256(file.read_bytes()) == entry.get("sha256"):
            done[entry["id"]] = entry
    return done


ENTRY_FIELDS = {"row": int, "id": str, "file": str, "sha256": str}  # what a manifest line must hold to be trusted


def _is_entry(entry) -> bool:
    """Whether a manifest line is an entry: an object with its fields of their types, its file a plain name."""
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in ENTRY_FIELDS.items())
            and Path(entry["file"]).name == entry["file"] and not entry["file"].startswith("."))  # fmt: skip


def _compact(out: Path, done: dict[str, dict]) -> None:
    """Rewrite the manifest with its valid entries only (atomically), so redone rows appear once."""
    manifest = out / MANIFEST
    text = "".join(json.dumps(entry) + "\n" for entry in done.values())
    if manifest.exists() and manifest.read_text(encoding="utf-8") != text:
        atomic_write_bytes(manifest, text.encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------ worker
class Painter:
    """A Ray Data worker: one loaded pipeline; a batch of rows in, their manifest lines out."""

    def __init__(self, settings: BatchSettings, out: str, threads: int | None):
        self.settings, self.out = settings, Path(out)
        self.pipe, self.resolved = start_pipeline(settings, threads)

    def __call__(self, batch: dict) -> dict:
        rows = [json.loads(text) for text in batch["row"]]
        lines, groups = [], {}
        for row in rows:  # each row checked alone first: a bad one is refused alone, before it joins a call
            options = call_options(row)
            negative = options.pop("negative_prompt", None)
            try:
                self.pipe.check(row["prompt"], negative, seed=row["seed"], **options)
            except Exception as err:  # noqa: BLE001 - any refusal is this row's, reported in its line
                lines.append(_refused(row, err))
                continue
            groups.setdefault(json.dumps(call_options(row), sort_keys=True), []).append(row)
        for group in groups.values():
            lines += self._paint(group)
        return {"line": lines}

    def _paint(self, rows: list[dict]) -> list[str]:
        """The rows' images written and their manifest lines. A call that fails is run again row by row, so only
        a row that fails alone gets an error line (the driver reports it and leaves it out of the manifest, so a
        fixed file reruns only it); nothing here ends the job."""
        options = call_options(rows[0])
        negative = options.pop("negative_prompt", None)
        try:
            result = self.pipe.generate([row["prompt"] for row in rows],
                                        None if negative is None else [negative] * len(rows),
                                        seed=[row["seed"] for row in rows], **options)  # fmt: skip
        except Exception as err:  # noqa: BLE001
            if len(rows) == 1:
                return [_refused(rows[0], err)]
            log.warning("a call of %d rows failed (%s: %s); each runs alone", len(rows), type(err).__name__, err)
            return [line for row in rows for line in self._paint([row])]
        lines = []
        for row, image in zip(rows, result.images, strict=True):
            data = encode(image)
            atomic_write_bytes(self.out / row["file"], data)
            entry = {"row": row["row"], "id": row["id"], "file": row["file"], "prompt": row["prompt"],
                     "seed": row["seed"], "model": self.settings.model,
                     "settings": {**self.resolved, **call_options(row)}, "sha256": _sha256(data)}
            lines.append(json.dumps(entry))
        return lines


def _refused(row: dict, err: Exception) -> str:
    reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    return json.dumps({"row": row["row"], "id": row["id"], "error": reason})


# ------------------------------------------------------------------------------------------------- driver
def run(prompts, out, settings: BatchSettings, *, seed: int = 0, address: str | None = None) -> dict:
    """Make every row's image not yet in ``out``'s manifest. Returns the counts (rows, skipped, made, failed) and
    the times: ``wall_s`` from the call (cluster start and model loads included) and ``first_s`` to the first
    finished batch; ``steady_images_per_s`` is the rate after that batch, once every worker is loaded."""
    start = time.perf_counter()
    settings.check()
    out = Path(out)
    rows = read_rows(prompts, settings.model, seed)
    out.mkdir(parents=True, exist_ok=True)
    done = finished(out)
    _compact(out, done)
    todo = [row for row in rows if row["id"] not in done]
    summary = {"rows": len(rows), "skipped": len(rows) - len(todo), "made": 0, "failed": []}
    if not todo:
        return summary
    import ray

    started = not ray.is_initialized()
    if started:  # workers' logs stay in Ray's log folder: a worker that fails is one line (_reported)
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    first = None  # (seconds, images) when the first batch came back: the rest is the steady rate
    try:
        with (out / MANIFEST).open("a", encoding="utf-8") as manifest:
            for lines in _reported(_painted(settings, out, todo)):
                entries = [json.loads(line) for line in lines]
                summary["failed"] += [entry for entry in entries if "error" in entry]
                made = [line for line, entry in zip(lines, entries, strict=True) if "error" not in entry]
                manifest.write("".join(line + "\n" for line in made))
                manifest.flush()
                os.fsync(manifest.fileno())
                summary["made"] += len(made)
                first = first or (time.perf_counter() - start, summary["made"])
                log.info("%d/%d images", summary["made"], len(todo))
    finally:
        if started:
            ray.shutdown()
    wall = time.perf_counter() - start
    first_s, first_made = first or (wall, 0)
    steady = (summary["made"] - first_made) / (wall - first_s) if summary["made"] > first_made else None
    return {**summary, "first_s": first_s, "wall_s": wall, "images_per_s": summary["made"] / wall,
            "steady_images_per_s": steady}


def _reported(batches):
    """The batches, with a worker that could not start (or a job Ray ended) said in one line."""
    try:
        yield from batches
    except Exception as err:  # noqa: BLE001 - Ray Data's report: the worker's own error, in one line
        raise ValueError(f"diffrt batch stopped: {startup_error(err)}") from None


def _painted(settings: BatchSettings, out: Path, todo: list[dict]):
    """Each finished batch's manifest lines, as Ray Data hands them back."""
    import ray

    total = ray.cluster_resources()
    gpu = total.get("GPU", 0) >= settings.workers and settings.device in (None, "cuda")
    cpus = cpu_share(total.get("CPU", 1), settings.workers, settings.worker_cpus)
    threads = None if gpu else torch_threads(cpus, given=settings.worker_cpus is not None)
    resources = {"num_gpus": 1} if gpu else {"num_cpus": cpus}
    dataset = ray.data.from_items([{"row": json.dumps(row)} for row in todo])
    painted = dataset.map_batches(
        Painter, fn_constructor_kwargs={"settings": settings, "out": str(out), "threads": threads},
        batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=settings.workers), **resources,
    )  # fmt: skip
    for batch in painted.iter_batches(batch_size=None, batch_format="numpy"):
        yield [str(line) for line in batch["line"]]


def describe(summary: dict, out) -> str:
    """What a run did, in lines: counts, the manifest, and each refused row with the pipeline's reason."""
    lines = [f"{summary['made']} images made, {summary['skipped']} of {summary['rows']} rows already done; manifest "
             f"{Path(out) / MANIFEST}"]  # fmt: skip
    if summary["made"]:
        steady = summary["steady_images_per_s"]
        lines.append(f"{summary['wall_s']:.1f} s: {summary['images_per_s']:.2f} images/s with the start-up, "
                     f"{steady:.2f} after the first batch" if steady else f"{summary['wall_s']:.1f} s")  # fmt: skip
    lines += [f"row {entry['row']} refused: {entry['error']}" for entry in sorted(summary["failed"],
                                                                                key=lambda e: e["row"])]
    return "\n".join(lines)

