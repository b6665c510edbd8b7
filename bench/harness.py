"""Shared benchmark plumbing: percentiles, the sampling arguments, and the result files (:mod:`diffrt.core.results`:
schema 1, environment stamp, atomic writes; its names are re-exported here).

Light on purpose: benchmark commands import it to build the command line, which starts without torch.
"""

from __future__ import annotations

from ..core import defaults
from ..core.results import SCHEMA, environment, write_result

__all__ = ["CALL_SETTINGS", "SCHEMA", "add_call_arguments", "environment", "fill_call_defaults", "percentiles",
           "write_result"]  # fmt: skip

CALL_SETTINGS = ("sampler", "steps", "guidance")


def percentiles(values) -> dict[str, float]:
    """p50, p90, p99 (linear interpolation, as numpy's default) and min of a list of timings."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("percentiles of an empty list")

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "min": ordered[0]}


def add_call_arguments(parser) -> None:
    """--sampler/--steps/--guidance; unset means the model's own defaults (its diffrt.json)."""
    parser.add_argument("--sampler", default=None, help="default: the model's")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")


def fill_call_defaults(args, pipe) -> None:
    """Replace unset sampling arguments by the pipeline's defaults, so the result file records what ran."""
    chosen = defaults.resolve(pipe.defaults, **{key: getattr(args, key) for key in CALL_SETTINGS})
    for key, value in chosen.items():
        setattr(args, key, value)
