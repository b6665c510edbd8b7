"""Package attributes that import their module on first use, so that a light command (``diffrt --help``)
does not pay for torch. Used by the package ``__init__`` files of ``diffrt.export`` and ``diffrt.train``."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``: ``names`` maps an attribute to the module holding it,
    relative to the package (``".onnx_export"``, ``"..models.artifacts"``)."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name], package), name)

    return __getattr__
