"""Model sources -> :class:`~diffrt.models.components.Components`: an embedded model or a preset (by name), a
local diffusers folder, or a deployed export folder (:mod:`diffrt.models.deployment`: config-only parts, no
torch modules).

A source is resolved once (:func:`resolve`: what it names, checked without reading weights, and the dtype a
deployed export runs at) and then loaded (:func:`load`). Names win over folders: load a local folder called
``fashion`` as ``./fashion``. Loading is offline, reads safetensors only (never pickle) and never runs remote code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import deployment, embedded, families, folders, presets
from .components import Components


@dataclass(frozen=True)
class Source:
    """A resolved model source: ``kind`` is "embedded", "preset", "folder" or "deployed"; ``dtype`` the dtype
    name a deployed export's graphs run at (None for the others: their weights take any)."""

    kind: str
    name: str | Path
    dtype: str | None = None


def resolve(source: str | os.PathLike | Source) -> Source:
    """What ``source`` names, with all that can be refused before weights are read: an unknown name or preset
    option, a path that is not there, a folder that is no diffusers folder (or export) of a family diffrt runs.
    Cheap: a command checks its model with it before starting workers that would load it."""
    if isinstance(source, Source):
        return source
    if isinstance(source, str) and source in embedded.NAMES:
        return Source("embedded", source)
    if presets.is_preset(source):
        presets.resolve(source)
        return Source("preset", source)
    path = _existing(source)
    manifest = deployment.export_manifest(path)
    if manifest is not None:  # an export folder: runs from its graphs alone, at their precision
        return Source("deployed", path, deployment.precision_dtype(manifest))
    if not path.is_dir():
        raise ValueError(f"model {path} is a file; give a diffusers folder (holding model_index.json)")
    index = folders.read_index(path)
    families.for_pipeline_class(index.get("_class_name"), f"{path}/model_index.json")
    return Source("folder", path)


def load_components(source: str | os.PathLike | Source, dtype=None, device=None) -> Components:
    """Load ``source``; ``dtype`` is the modules' torch dtype (default: the weights' own, float32 for the
    embedded models). Presets are built on ``device`` (their random weights need no host copy)."""
    source = resolve(source)
    if source.kind == "embedded":
        return embedded.load(source.name, dtype)
    if source.kind == "preset":
        return presets.load(source.name, dtype, device)
    if source.kind == "deployed":
        return deployment.load(source.name, dtype)
    return folders.load_folder(source.name, dtype)


def _existing(source) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(source)!r} is neither an embedded model ({', '.join(embedded.NAMES)}), "
            f"a preset ({', '.join(presets.names())}) nor an existing folder"
        )
    return path
