"""Export specs: the inputs and outputs of every graph of a pipeline, their dynamic axes, and engine profiles.

A graph's tensors are described by their dims. A dynamic dim is a :class:`Dim` over one of four shape
variables (``batch``, ``height``, ``width`` in pixels, ``sequence`` in tokens); latent dims are the pixel
size divided by the VAE's factor. The same specs drive the ONNX export (names, dynamic axes, sample inputs),
TensorRT optimization profiles (min/opt/max shapes) and the input checks of the exported-graph backends.
Names are exactly the torch backend's (see :mod:`diffrt.backends.torch_backend`).
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

    @property
    def axis_name(self) -> str:
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
        default = components.unet.config.sample_size * components.vae_scale_factor
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
    """Image sizes the exported U-Net runs at: multiples of the VAE factor times 2 per U-Net down block
    but the last. (Eager diffusers pads other sizes with Python control flow that a traced graph fixes.)"""
    return components.vae_scale_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)


def _sequence_length(components) -> int:
    return int(components.tokenizers[0].model_max_length)


def graph_profile(spec: GraphSpec, ranges: ShapeRanges) -> dict[str, tuple[int, int, int]]:
    """Per shape variable of ``spec``: (min, opt, max) from the pipeline's ranges, rounded to the graph's
    multiples and clipped to its limits; the U-Net's batch doubled for guidance."""
    profile = {}
    for var in spec.variables:
        lo, opt, hi = getattr(ranges, var)
        if var == "batch" and spec.name == "unet":
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
    encoders = ["text_encoder", "text_encoder_2"][: len(components.text_encoders)]
    return [*encoders, "unet", "vae_encoder", "vae_decoder"]


def graph_specs(components) -> dict[str, GraphSpec]:
    """The specs of every graph of ``components`` (a :class:`diffrt.loading.Components`), by graph name."""
    specs = {}
    for index, name in enumerate(graph_names(components)[: len(components.text_encoders)]):
        specs[name] = _text_encoder_spec(name, components.text_encoders[index])
    specs["unet"] = _unet_spec(components)
    specs.update(_vae_specs(components))
    return specs


def _text_encoder_spec(name: str, encoder) -> GraphSpec:
    cfg = encoder.config
    outputs = [TensorSpec("hidden", (Dim("batch"), Dim("sequence"), cfg.hidden_size))]
    if type(encoder).__name__.endswith("WithProjection"):
        outputs.append(TensorSpec("pooled", (Dim("batch"), cfg.projection_dim)))
    return GraphSpec(
        name,
        (TensorSpec("input_ids", (Dim("batch"), Dim("sequence")), "int64", 0, cfg.vocab_size),),
        tuple(outputs),
        limits={"sequence": (1, cfg.max_position_embeddings)},
    )


def _unet_spec(components) -> GraphSpec:
    cfg = components.unet.config
    f = components.vae_scale_factor
    b, h, w = Dim("batch"), Dim("height", f), Dim("width", f)
    inputs = [
        TensorSpec("sample", (b, cfg.in_channels, h, w)),
        TensorSpec("timestep", (b,), "float32", 0.0, 1000.0),
        TensorSpec("encoder_hidden_states", (b, Dim("sequence"), cfg.cross_attention_dim)),
    ]
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs += [TensorSpec("text_embeds", (b, pooled)), TensorSpec("time_ids", (b, 6), "float", 0.0, 1024.0)]
    if cfg.get("time_cond_proj_dim"):
        inputs.append(TensorSpec("timestep_cond", (b, cfg.time_cond_proj_dim)))
    m = pixel_multiple(components)
    return GraphSpec(
        "unet",
        tuple(inputs),
        (TensorSpec("out", (b, cfg.out_channels, h, w)),),
        multiples={"height": m, "width": m},
    )


def _vae_specs(components) -> dict[str, GraphSpec]:
    cfg = components.vae.config
    f = components.vae_scale_factor
    b = Dim("batch")
    image = TensorSpec("image", (b, cfg.in_channels, Dim("height"), Dim("width")), "float", -1.0, 1.0)
    latent = TensorSpec("latent", (b, cfg.latent_channels, Dim("height", f), Dim("width", f)))
    decoded = TensorSpec("image", (b, cfg.out_channels, Dim("height"), Dim("width")))
    multiples = {"height": f, "width": f}
    return {
        "vae_encoder": GraphSpec("vae_encoder", (image,), (latent,), multiples=multiples),
        "vae_decoder": GraphSpec("vae_decoder", (latent,), (decoded,), multiples=multiples),
    }
