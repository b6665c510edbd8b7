"""Model families: one module each (``sd`` for SD 1.x/2.x, ``sdxl``, ``sd3``, ``flux``) says what is specific
to it (the transformer families share ``dit``).

A family knows its graphs (spec + the torch module computing it), how prompts become conditioning, how latents
are shaped, which diffusers pipeline classes it loads and how its folders are written. Bound to loaded
components it is the model (:func:`model`) that the pipeline, backends, export and loading ask; adding a family
= adding its module and registering it below.
"""

from __future__ import annotations

from .base import Family
from .flux import FLUX
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL

FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SDXL, SD3, FLUX)}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model(components) -> Family:
    """The loaded model: the family of ``components`` bound to them (:meth:`Family.bind`)."""
    return get(components.family).bind(components)


def for_denoiser_class(class_name, where) -> Family:
    """The family whose denoiser is diffusers class ``class_name`` (read from ``where``)."""
    for family in FAMILIES.values():
        if class_name in family.denoiser_classes:
            return family
    raise ValueError(f"{where}: unknown denoiser class {class_name!r}")


def for_pipeline_class(class_name, where) -> Family:
    """The family that loads diffusers pipeline ``class_name`` (from ``where``'s model_index.json)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    supported = sorted(c for family in FAMILIES.values() for c in family.pipeline_classes)
    raise ValueError(f"unsupported model family {class_name!r} in {where}; supported: {', '.join(supported)}")
