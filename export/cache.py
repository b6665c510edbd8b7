"""The one way an artifact folder is filled, shared by the ONNX export and the TensorRT engine builds.

A folder belongs to one model and one set of settings (its key). ``cached`` is the lock-free fast path:
finished, verified files need no lock to be read. ``fill`` holds the folder's lock, starts a fresh manifest
when the key changed, keeps every graph whose files are intact (and that ``keep`` accepts), makes the rest
one by one and writes the manifest after each, so a killed writer loses at most the graph it was on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ..core.files import atomic_write_json
from ..models import deployment
from ..models.artifacts import MANIFEST, locked, read_manifest, valid_manifest, verify_graph

log = logging.getLogger(__name__)


def cached(folder: Path, kind: str, key: str, graphs: list[str]) -> dict | None:
    """The manifest when ``folder`` holds every graph of ``graphs`` under ``key`` with intact files, else None."""
    manifest = valid_manifest(folder, kind)
    if manifest is None or manifest.get("key") != key:
        return None
    if all(g in manifest["graphs"] and not verify_graph(folder, kind, manifest["graphs"][g]) for g in graphs):
        return manifest
    return None


def fill(folder: Path, kind: str, key: str, graphs: list[str], *, what: str, new_manifest: Callable[[], dict],
         make: Callable[[str], dict], keep: Callable[[str, dict], bool] = lambda graph, record: True,
         force: bool = False) -> dict:  # fmt: skip
    """Make every graph of ``graphs`` that ``folder`` lacks (or holds damaged, or ``force``) with ``make(graph)``
    -> its manifest record; returns the manifest."""
    with locked(folder, what):
        manifest = valid_manifest(folder, kind)
        if manifest is None or manifest.get("key") != key:
            manifest = new_manifest()
        for graph in graphs:
            record = manifest["graphs"].get(graph)
            if record is not None and not force and keep(graph, record):
                problem = verify_graph(folder, kind, record)
                if problem is None:
                    continue
                log.warning("rebuilding %s graph %r: %s", kind, graph, problem)
            manifest["graphs"][graph] = make(graph)
            atomic_write_json(folder / MANIFEST, manifest)  # after each graph: progress kept
    return manifest


def update(folder: Path, what: str, change: Callable[[dict], bool]) -> dict:
    """Apply ``change(manifest) -> changed`` under the folder's lock; the manifest is rewritten if it changed."""
    with locked(folder, what):
        manifest = read_manifest(folder)
        if change(manifest):
            atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def add_deployment(components, folder: Path, what: str) -> dict:
    """Write what runs ``folder`` without the model (:mod:`diffrt.models.deployment`) and record it in the manifest;
    a model that cannot be deployed keeps a graphs-only folder, with a log line saying why."""
    reason = deployment.unsupported(components)
    if reason is not None:
        log.info("%s has no deployment record (%s): it runs with the model loaded beside it", what, reason)
        return read_manifest(folder)

    def change(manifest: dict) -> bool:
        manifest["deployment"] = deployment.write(components, folder)
        return True

    return update(folder, what, change)
