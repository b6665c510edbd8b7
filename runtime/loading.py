"""Model sources -> :class:`~diffrt.components.Components`: an embedded model or a preset (by name), a local
diffusers folder, or a deployed export folder (:mod:`diffrt.deployment`: config-only parts, no torch modules).

Names win over folders: load a local folder called ``fashion`` as ``./fashion``. Loading is offline, reads
safetensors only (never pickle) and never runs remote code. The names below stay importable from here for
code written against earlier versions (``Components``, ``save_components``, ``BUILTIN_DEFAULTS``).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import deployment, embedded, families, folders, presets
from .components import Components
from .defaults import BUILTIN as BUILTIN_DEFAULTS
from .defaults import DEFAULTS_FILE

__all__ = ["BUILTIN_DEFAULTS", "DEFAULTS_FILE", "Components", "load_components", "save_components"]

save_components = folders.save_folder
# Earlier names, now read off the family modules: pipeline class -> family name, and the text-encoder classes
FAMILIES = {cls: family.name for family in families.FAMILIES.values() for cls in family.pipeline_classes}
TEXT_ENCODER_CLASSES = tuple(dict.fromkeys(c for f in families.FAMILIES.values() for c in f.text_encoder_classes))


def is_named(source) -> bool:
    """Whether ``source`` names an embedded model or a preset (names win over folders of that name)."""
    return isinstance(source, str) and (source in embedded.NAMES or presets.is_preset(source))


def load_components(source: str | os.PathLike, dtype=None, device=None) -> Components:
    """Load ``source``; ``dtype`` is the modules' torch dtype (default: the weights' own, float32 for the
    embedded models). Presets are built on ``device`` (their random weights need no host copy)."""
    if isinstance(source, str) and source in embedded.NAMES:
        return embedded.load(source, dtype)
    if presets.is_preset(source):
        return presets.load(source, dtype, device)
    path = _existing(source)
    if deployment.is_deployment(path):  # an export folder: runs from its graphs alone
        return deployment.load(path, dtype)
    return folders.load_folder(path, dtype)


def check_source(source) -> None:
    """What ``load_components(source)`` would refuse that needs no weights read: an unknown name or preset
    option, a path that is not there, a folder that is no diffusers folder (or export) of a family diffrt runs.
    Cheap: a command checks its model with it before starting workers that would load it."""
    if isinstance(source, str) and source in embedded.NAMES:
        return
    if presets.is_preset(source):
        presets.resolve(source)
        return
    path = _existing(source)
    if deployment.is_deployment(path):
        return
    if not path.is_dir():
        raise ValueError(f"model {path} is a file; give a diffusers folder (holding model_index.json)")
    index = folders.read_index(path)
    families.for_pipeline_class(index.get("_class_name"), f"{path}/model_index.json")


def _existing(source) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(source)!r} is neither an embedded model ({', '.join(embedded.NAMES)}), "
            f"a preset ({', '.join(presets.names())}) nor an existing folder"
        )
    return path
