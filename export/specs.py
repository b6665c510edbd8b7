"""Export-side use of the graph specs: the shape ranges an export or engine covers and its profiles.

The specs themselves (:class:`~diffrt.core.graphspec.GraphSpec`: names, dims, dtypes) are the model family's
(:mod:`diffrt.models.families`); they drive the ONNX export (names, dynamic axes, sample inputs), the TensorRT
optimization profiles built here (min/opt/max shapes) and the exported-graph backends' input checks. The spec
names below stay importable from this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.graphspec import PRECISIONS, TORCH_DTYPES, VARIABLES, Dim, GraphSpec, TensorSpec
from ..models import families
from ..models.families import unet_control

__all__ = ["PRECISIONS", "TORCH_DTYPES", "VARIABLES", "Dim", "GraphSpec", "ShapeRanges", "TensorSpec", "graph_names",
           "graph_profile", "graph_specs", "input_profile_shapes", "pixel_multiple"]  # fmt: skip

DENOISER_GRAPHS = ("unet", "transformer")  # the graphs classifier-free guidance runs at twice the batch


def guided_graph(name: str) -> bool:
    """Whether classifier-free guidance runs graph ``name`` at twice the images' batch (ControlNets too)."""
    return name in DENOISER_GRAPHS or unet_control.is_graph(name)


@dataclass(frozen=True)
class ShapeRanges:
    """(min, opt, max) of the images' batch, height, width and the prompt's token count: the engine profiles.

    The U-Net's batch is twice the images' (classifier-free guidance runs both halves in one call); its
    minimum stays 1 (guidance off)."""

    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] | None = None  # None: the model's (min_size, default_size, 2 * default_size)
    width: tuple[int, int, int] | None = None
    sequence: tuple[int, int, int] | None = None  # None: (1, L, L), L = the tokenizer's padded length

    def resolved(self, components) -> ShapeRanges:
        size = pixel_multiple(components)
        default = families.model(components).default_size()
        pixels = (size, default, max(default * 2, size))
        length = _sequence_length(components)
        ranges = ShapeRanges(
            self.batch, self.height or pixels, self.width or pixels, self.sequence or (1, length, length)
        )
        for var in VARIABLES:
            _check_range(var, getattr(ranges, var))
        return ranges

    def as_dict(self) -> dict[str, list[int]]:
        return {var: list(getattr(self, var)) for var in VARIABLES if getattr(self, var) is not None}


def _check_range(var: str, triple) -> None:
    ok = (
        isinstance(triple, tuple | list) and len(triple) == 3 and all(isinstance(v, int) for v in triple)
        and 1 <= triple[0] <= triple[1] <= triple[2]
    )  # fmt: skip
    if not ok:
        raise ValueError(f"{var} range must be three integers 1 <= min <= opt <= max, got {triple!r}")


def pixel_multiple(components) -> int:
    """Image sizes the exported U-Net runs at (the family's size multiple)."""
    return families.model(components).size_multiple()


def _sequence_length(components) -> int:
    return families.model(components).sequence_length()


def graph_profile(spec: GraphSpec, ranges: ShapeRanges) -> dict[str, tuple[int, int, int]]:
    """Per shape variable of ``spec``: (min, opt, max) from the pipeline's ranges, rounded to the graph's
    multiples and clipped to its limits; the denoiser's and ControlNets' batch doubled for guidance."""
    profile = {}
    for var in spec.variables:
        lo, opt, hi = getattr(ranges, var)
        if var == "batch" and guided_graph(spec.name):
            opt, hi = 2 * opt, 2 * hi
        m = spec.multiples.get(var, 1)
        lo, hi = -(-lo // m) * m, hi // m * m
        limit_lo, limit_hi = spec.limits.get(var, (1, None))
        lo, hi = max(lo, limit_lo), hi if limit_hi is None else min(hi, limit_hi)
        if lo > hi:
            raise ValueError(
                f"{spec.name}: the {var} range {getattr(ranges, var)} holds no multiple of {m} "
                f"within the graph's limits ({limit_lo}..{limit_hi})"
            )
        opt = min(max(round(opt / m) * m, lo), hi)
        profile[var] = (lo, opt, hi)
    return profile


def input_profile_shapes(spec: GraphSpec, profile: dict[str, tuple[int, int, int]]):
    """Input name -> (min shape, opt shape, max shape): what a TensorRT optimization profile takes."""
    at = [{var: triple[k] for var, triple in profile.items()} for k in range(3)]
    return {t.name: tuple(t.shape(values) for values in at) for t in spec.inputs}


def graph_names(components) -> list[str]:
    return families.model(components).graph_names()


def graph_specs(components) -> dict[str, GraphSpec]:
    """The specs of every graph of ``components``, by graph name (the family's)."""
    return families.model(components).graph_specs()
