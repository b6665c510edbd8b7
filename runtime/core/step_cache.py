"""Step caching: reuse work of earlier denoising steps instead of recomputing the whole model at every step.

Two methods, one per kind of denoiser:

- ``deepcache`` (U-Nets; Ma et al. 2023, "DeepCache"): every ``interval`` model calls the full U-Net runs
  and the feature entering its outer ``depth`` up blocks is kept; the calls in between run only the outer
  ``depth`` down and up blocks on that kept feature. The schedule is fixed in advance: no host sync, so the
  captured CUDA-graph loop holds it.
- ``fbcache`` (transformers; the first-block cache of TeaCache / ParaAttention): every call runs the first
  block; the rest of the blocks are skipped and their last residual reused when the first block's residual
  changed by less than ``threshold`` (mean absolute change relative to the last fully computed call). That
  decision reads a number on the host (one sync per call), so those loops run eagerly. With ``interval``
  instead of ``threshold`` the schedule is fixed (all blocks every ``interval`` calls) and capturable.

Both always compute the first ``warmup`` calls and the last call fully. Calls are counted as model calls:
a two-call step (heun, dpm2) counts twice. With classifier-free guidance both branches run as one batch,
so the kept tensors hold each branch's own rows (a cache per branch); fbcache decides for the batch.

Specs: a :class:`CacheConfig`, or a string ``kind[:option=value,...]`` such as ``deepcache:interval=3``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

KINDS = {
    "deepcache": ("interval", "depth", "warmup"),
    "fbcache": ("threshold", "interval", "warmup"),
}
DEFAULTS = {"deepcache": {"interval": 3}, "fbcache": {"threshold": 0.1}}


@dataclass(frozen=True)
class CacheConfig:
    """What to cache and when (see the module docstring); build it with :func:`parse` or directly."""

    kind: str
    interval: int | None = None  # a full call every `interval` calls (deepcache; fbcache's fixed schedule)
    threshold: float | None = None  # fbcache: reuse while the first block's residual changed less than this
    depth: int = 1  # deepcache: the outer U-Net levels recomputed at cached calls
    warmup: int = 1  # the first calls that are always computed fully

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown cache kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        _require_int("interval", self.interval, 1, allow_none=True)
        _require_int("depth", self.depth, 1)
        _require_int("warmup", self.warmup, 0)
        if self.threshold is not None and (not _is_number(self.threshold) or not self.threshold >= 0):
            raise ValueError(f"cache threshold must be a number >= 0, got {self.threshold!r}")
        if self.kind == "deepcache":
            if self.threshold is not None:
                raise ValueError("deepcache has a fixed schedule: give interval=, not threshold=")
            if self.interval is None:
                raise ValueError("deepcache needs interval= (a full U-Net call every `interval` calls)")
        elif (self.interval is None) == (self.threshold is None):
            raise ValueError("fbcache takes one of threshold= (skip while the first block barely changes) or "
                             "interval= (a fixed schedule), not both and not neither")  # fmt: skip
        if self.kind == "fbcache" and self.depth != 1:
            raise ValueError("depth= is a deepcache option (the U-Net levels it recomputes); fbcache has none")

    @property
    def static(self) -> bool:
        """Whether the schedule is fixed in advance (no host sync: a captured loop can hold it)."""
        return self.threshold is None

    @property
    def key(self) -> tuple:
        return tuple((f.name, getattr(self, f.name)) for f in fields(self))

    def __str__(self) -> str:
        """The short form, leaving out options at their defaults: ``parse(str(config)) == config``."""
        defaults = {f.name: f.default for f in fields(self)}
        options = [f"{name}={getattr(self, name)}" for name in KINDS[self.kind]
                   if getattr(self, name) not in (None, defaults[name])]  # fmt: skip
        return self.kind + (":" + ",".join(options) if options else "")


def parse(spec) -> CacheConfig | None:
    """A :class:`CacheConfig` from a config, a string ``kind[:option=value,...]``, or None (no cache)."""
    if spec is None or isinstance(spec, CacheConfig):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"cache must be a CacheConfig, a string such as 'deepcache:interval=3' or None, "
                         f"got {type(spec).__name__}")  # fmt: skip
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r} in {spec!r}; allowed: {', '.join(KINDS)}")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in KINDS[kind]:
            raise ValueError(f"bad cache option {item!r} in {spec!r}; {kind} takes "
                             f"{', '.join(o + '=' for o in KINDS[kind])}")  # fmt: skip
        options[name] = _number(value.strip(), name, spec)
    if not {"interval", "threshold"} & set(options):
        options.update(DEFAULTS[kind])
    return CacheConfig(kind, **options)


def _number(text: str, name: str, spec: str):
    try:
        return float(text) if name == "threshold" else int(text)
    except ValueError:
        kind = "a number" if name == "threshold" else "an integer"
        raise ValueError(f"cache option {name} must be {kind}, got {text!r} in {spec!r}") from None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"cache {name} must be an integer >= {low}, got {value!r}")


@dataclass
class CacheSession:
    """One call's cache: which model call this is, what is kept from the last full call, and the tally."""

    config: CacheConfig
    total_calls: int  # the loop's model calls: the last is always full
    call: int = 0
    full_calls: int = 0
    kept: dict = field(default_factory=dict)

    @property
    def cached_calls(self) -> int:
        return self.call - self.full_calls

    def scheduled_full(self) -> bool:
        return is_scheduled_full(self.config, self.call, self.total_calls)

    def advance(self, full: bool) -> None:
        self.call += 1
        self.full_calls += int(full)


def is_scheduled_full(config: CacheConfig, call: int, total_calls: int) -> bool:
    """The fixed part of a schedule: the first call, the warm-up, the last call and every ``interval``-th."""
    if call == 0 or call < config.warmup or call >= total_calls - 1:
        return True
    return config.interval is not None and call % config.interval == 0


def static_full_calls(config: CacheConfig, total_calls: int) -> int:
    """How many of ``total_calls`` a fixed schedule computes fully."""
    return sum(is_scheduled_full(config, i, total_calls) for i in range(total_calls))


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old| over the whole batch, in float32."""
    new, old = new.float(), old.float()
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


def run_deepcache(session: CacheSession, piece, inputs: dict) -> torch.Tensor:
    """One U-Net call under DeepCache. ``piece(name)`` gives the graph module's functions: ``deep_full(depth,
    **inputs) -> (out, feature)`` and ``deep_partial(depth, feature, **inputs) -> out``."""
    depth = session.config.depth
    full = session.scheduled_full()
    if full:
        out, session.kept["feature"] = piece("deep_full")(depth, **inputs)
    else:
        out = piece("deep_partial")(depth, session.kept["feature"], **inputs)
    session.advance(full)
    return out


def run_first_block(session: CacheSession, piece, inputs: dict) -> torch.Tensor:
    """One transformer call under fbcache. Pieces: ``first_block(**inputs) -> (before, after, carry)`` (the
    image tokens before and after the first block, and what the other blocks need), ``other_blocks(after,
    carry) -> hidden`` and ``finish(hidden, carry) -> out``."""
    before, after, carry = piece("first_block")(**inputs)
    adaptive = not session.config.static
    first_residual = after - before if adaptive else None  # only the threshold reads it
    full = session.scheduled_full() or (
        adaptive and relative_change(first_residual, session.kept["first_residual"]) >= session.config.threshold)
    if full:
        hidden = piece("other_blocks")(after, carry)
        session.kept.update(first_residual=first_residual, rest_residual=hidden - after)
    else:
        hidden = after + session.kept["rest_residual"]
    session.advance(full)
    return piece("finish")(hidden, carry)


RUNNERS = {"deepcache": run_deepcache, "fbcache": run_first_block}
