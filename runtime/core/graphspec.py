"""Graph specs: the named inputs and outputs of a pipeline graph (text encoders, U-Net, VAE), and their dims.

A graph's tensors are described by their dims. A dynamic dim is a :class:`Dim` over one of four shape
variables (``batch``, ``height``, ``width`` in pixels, ``sequence`` in tokens); latent dims are the pixel
size divided by the VAE's factor. Model families declare their graphs' specs (:mod:`diffrt.models.families`); the
same specs drive the backends' input checks, the ONNX export (names, dynamic axes, sample inputs) and the
TensorRT optimization profiles (:mod:`diffrt.export.specs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VARIABLES = ("batch", "height", "width", "sequence")
PRECISIONS = ("fp32", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Dim:
    """A dynamic dim: the shape variable ``var`` divided by ``divisor`` (latents are pixels / VAE factor)."""

    var: str
    divisor: int = 1
    label: str | None = None  # the axis's name in exported graphs when the default would be ambiguous

    @property
    def axis_name(self) -> str:
        if self.label is not None:
            return self.label
        return self.var if self.divisor == 1 else f"latent_{self.var}"

    def size(self, values: dict[str, int]) -> int:
        return values[self.var] // self.divisor


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``dtype`` "float" follows the export precision; "float32"/"int64" are fixed.
    Sample values are uniform in [low, high) when both are given (integers for int64), else standard normal."""

    name: str
    dims: tuple[int | Dim, ...]
    dtype: str = "float"
    low: float | None = None
    high: float | None = None

    def shape(self, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(d.size(values) if isinstance(d, Dim) else d for d in self.dims)

    def torch_dtype(self, precision: str) -> torch.dtype:
        if self.dtype == "int64":
            return torch.int64
        return torch.float32 if self.dtype == "float32" else TORCH_DTYPES[precision]

    def describe(self) -> list[int | str]:
        return [d.axis_name if isinstance(d, Dim) else d for d in self.dims]


@dataclass(frozen=True)
class GraphSpec:
    """A graph's named inputs and outputs, the multiples its pixel sizes need and hard limits of its axes."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    multiples: dict[str, int] = field(default_factory=dict)  # var -> the values must be multiples of this
    limits: dict[str, tuple[int, int]] = field(default_factory=dict)  # var -> (min, max) the graph can run

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def variables(self) -> list[str]:
        """The shape variables this graph's dims use, in VARIABLES order."""
        used = {d.var for t in (*self.inputs, *self.outputs) for d in t.dims if isinstance(d, Dim)}
        return [v for v in VARIABLES if v in used]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes: tensor name -> {axis index: axis name}."""
        return {
            t.name: {i: d.axis_name for i, d in enumerate(t.dims) if isinstance(d, Dim)}
            for t in (*self.inputs, *self.outputs)
        }

    def signature(self) -> dict:
        """What the graph's files depend on besides weights: names, dims, dtypes (a cache-key ingredient)."""
        return {
            "inputs": [[t.name, t.describe(), t.dtype] for t in self.inputs],
            "outputs": [[t.name, t.describe(), t.dtype] for t in self.outputs],
            "multiples": dict(sorted(self.multiples.items())),
        }

    def sample_inputs(self, values: dict[str, int], precision: str = "fp32", *, generator=None, device="cpu"):
        """Random inputs at the shapes ``values`` gives (seeded by ``generator``), as a name -> tensor dict."""
        out = {}
        for t in self.inputs:
            shape = t.shape(values)
            if t.dtype == "int64":
                x = torch.randint(int(t.low), int(t.high), shape, generator=generator)
            elif t.low is not None:
                x = torch.rand(shape, generator=generator) * (t.high - t.low) + t.low
            else:
                x = torch.randn(shape, generator=generator)
            out[t.name] = x.to(device=device, dtype=t.torch_dtype(precision))
        return out

    def output_shapes(self, values: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(values) for t in self.outputs}

    def check_inputs(self, inputs: dict, profile: dict[str, tuple[int, int, int]] | None = None) -> dict[str, int]:
        """Check names, ranks, fixed dims, the multiples and limits (and ``profile``'s ranges when given);
        return the shape variables' values. Every failure is a ValueError naming the input and what is allowed."""
        missing = [n for n in self.input_names if n not in inputs]
        unknown = sorted(set(inputs) - set(self.input_names))
        if missing or unknown:
            raise ValueError(
                f"graph {self.name!r} takes inputs {self.input_names}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown {unknown}" if unknown else "")
            )
        values: dict[str, int] = {}
        seen: dict[str, str] = {}
        for t in self.inputs:
            shape = tuple(inputs[t.name].shape)
            if len(shape) != len(t.dims):
                raise ValueError(f"{self.name} input {t.name!r} must have shape {t.describe()}, got {list(shape)}")
            for axis, (d, size) in enumerate(zip(t.dims, shape, strict=True)):
                if not isinstance(d, Dim):
                    if size != d:
                        raise ValueError(
                            f"{self.name} input {t.name!r} axis {axis} must be {d} (shape {t.describe()}), "
                            f"got {list(shape)}"
                        )
                    continue
                value = size * d.divisor
                if d.var in values and values[d.var] != value:
                    raise ValueError(
                        f"{self.name} inputs disagree on {d.var}: {seen[d.var]} gives {values[d.var]}, "
                        f"{t.name!r} gives {value}"
                    )
                values[d.var], seen[d.var] = value, repr(t.name)
        for var, value in values.items():
            self._check_value(var, value, profile)
        return values

    def _check_value(self, var: str, value: int, profile) -> None:
        multiple = self.multiples.get(var, 1)
        if value % multiple:
            raise ValueError(
                f"{self.name}: {var} {value} is not a multiple of {multiple}, which the exported graph needs "
                f"(use {var} = {max(multiple, value // multiple * multiple)} or {(value // multiple + 1) * multiple})"
            )
        low, high = self.limits.get(var, (1, None))
        if value < low or (high is not None and value > high):
            raise ValueError(f"{self.name}: {var} {value} is outside what the graph supports [{low}, {high}]")
        if profile is not None and var in profile:
            lo, _, hi = profile[var]
            if not lo <= value <= hi:
                raise ValueError(
                    f"{self.name}: {var} {value} is outside the engine's optimization profile [{lo}, {hi}]; "
                    f"rebuild the engine with a profile that covers it"
                )
