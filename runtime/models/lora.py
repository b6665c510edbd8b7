"""LoRA adapters merged into a loaded model's weights in place, switched without rebuilding anything.

A file is read (safetensors only: diffrt never unpickles), its keys brought to diffusers' naming by the
family's diffusers pipeline class (``lora_state_dict``: kohya/A1111 ``lora_unet_*``/``lora_te*_`` keys, SGM
block names for SDXL), and every adapted layer becomes a :class:`Factor` (``down``/``up`` matrices, alpha).
What diffusers leaves to PEFT at run time (mapping its older suffixes to modules, the alphas, the layer lookup)
is done here by hand, in :func:`parse`.

:class:`Adapters` keeps, for each touched weight, a copy of the base weight and writes
``base + sum(scale * alpha / rank * up @ down)`` through the backend's ``write_weights`` (the torch-based
backends copy into the same parameter storage, so compiled code and captured CUDA graphs see the new weights;
the exported-graph backends replace initializers or refit engines). A weight no adapter touches any more gets
its base copy back bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.checks import number, shown
from ..core.files import safetensors_file
from . import embedded, families

log = logging.getLogger(__name__)

FOLDER_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes into a folder
PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # key prefixes, as diffusers writes them
# (down suffix, up suffix) of the layer formats diffusers' lora_state_dict hands back
_FACTOR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),  # PEFT (diffusers' current format)
    (".lora.down.weight", ".lora.up.weight"),  # diffusers' earlier format; kohya files after conversion
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # earlier text-encoder format
)
# diffusers' attention-processor keys (``attn1.processor.to_q_lora.down.weight``): the layer each one adapts
_PROCESSOR_LAYERS = {"denoiser": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}  # fmt: skip
_PROCESSOR_KEY = re.compile(
    r"^(?P<parent>.*?)(\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight$"
)


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class Factor:
    """One adapted layer: ``weight += scale * alpha / rank * up @ down`` (alpha None: alpha = rank)."""

    part: str  # "unet", "transformer", "text_encoder" or "text_encoder_2"
    module: str  # the layer's path inside that part
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None = None
    rs: bool = False  # rank-stabilized (PEFT use_rslora): alpha / sqrt(rank)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def target(self) -> tuple[str, str]:
        return self.part, self.module

    @property
    def scaling(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rs else self.rank)

    def delta(self, shape) -> torch.Tensor:
        """The float32 update of a weight of ``shape`` at scale 1."""
        update = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (self.scaling * update).reshape(shape)


@dataclass
class Adapter:
    name: str
    path: Path
    factors: dict[tuple[str, str], Factor]
    scale: float = 1.0

    def info(self) -> dict:
        ranks = sorted({f.rank for f in self.factors.values()})
        parts = sorted({f.part for f in self.factors.values()})
        return {"path": str(self.path), "scale": self.scale, "ranks": ranks, "layers": len(self.factors),
                "parts": parts, "targets": sorted({_layer_kind(f.module) for f in self.factors.values()})}  # fmt: skip


def _layer_kind(module: str) -> str:
    """A layer's name without its block path, as PEFT's target_modules name it (``to_q``, ``to_out.0``)."""
    *parents, last = module.split(".")
    return f"{parents[-1]}.{last}" if last.isdigit() and parents else last


# ----------------------------------------------------------------------------------------------- reading
def adapter_file(path) -> Path:
    """The safetensors file of a LoRA given as a file, a folder holding ``pytorch_lora_weights.safetensors`` or
    the name of an embedded one (``fashion-lora``)."""
    if isinstance(path, str) and path in embedded.LORAS:
        path = embedded.adapter_folder(path)
    try:
        return safetensors_file(path, FOLDER_FILE, "LoRA")
    except ValueError as err:
        raise LoraError(str(err)) from None


def read(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a LoRA file and the PEFT settings saved in its header (``{part: {lora_alpha, ...}}``)."""
    from safetensors import SafetensorError, safe_open

    file = adapter_file(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise LoraError(f"{file} is not a readable safetensors file: {err}") from err
    return tensors, _peft_settings(header.get("lora_adapter_metadata"), file)


MAX_SCALE = 100.0  # a LoRA's scale: past this any merged weight is the adapter's alone, or overflows
MAX_ALPHA = 65536.0  # lora_alpha (and kohya's per-layer alphas): ranks are at most a few thousand


def _peft_settings(packed: str | None, file: Path) -> dict[str, dict]:
    """diffusers packs each part's LoraConfig into the header as ``{"unet.lora_alpha": 8, ...}``: read and
    checked here, field by field, naming the file (the values diffrt uses: alphas, patterns, rsLoRA)."""
    if not packed:
        return {}
    try:
        flat = json.loads(packed)
    except (json.JSONDecodeError, RecursionError) as err:
        raise LoraError(f"{file}: its lora_adapter_metadata is not JSON: {err}") from err
    if not isinstance(flat, dict):
        raise LoraError(f"{file}: its lora_adapter_metadata must be a JSON object, got {type(flat).__name__}")
    settings: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        settings.setdefault(part, {})[name] = _header_field(file, key, name, value)
    return settings


def _header_field(file: Path, key: str, name: str, value):
    """One lora_adapter_metadata field, checked where diffrt reads it."""
    where = f"{file}: lora_adapter_metadata {key}"
    try:
        if name == "lora_alpha" and value is not None:
            return number(where, value, 0, MAX_ALPHA, low_open=True)
        if name == "use_rslora" and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {shown(value)}")
        if name == "alpha_pattern" and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where} must be an object of {{layer pattern: alpha}}, got {type(value).__name__}")
            for pattern, alpha in value.items():
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{where}: {pattern!r} is not a valid pattern ({err})") from None
                number(f"{where}[{pattern!r}]", alpha, 0, MAX_ALPHA, low_open=True)
    except ValueError as err:
        raise LoraError(str(err)) from None
    return value


def check_file(path) -> None:
    """The checks a LoRA file gets before it is applied that need no model: readable, its header's fields and
    every tensor checked (a server checks its LoRAs with it before it starts)."""
    tensors, _ = read(path)
    check_tensors(tensors, adapter_file(path))


# ----------------------------------------------------------------------------------------------- parsing
def parse(components, tensors: dict, settings: dict, file: Path) -> tuple[dict, list[str]]:
    """The factors of a LoRA state dict for ``components`` and the keys that adapt nothing here.

    Shapes are checked against the model's layers: a LoRA made for another architecture names its first
    mismatching layer and both shapes."""
    model = families.model(components)
    dora = [k for k in tensors if "dora_scale" in k]
    if dora:  # DoRA rescales each merged weight's columns: dropping its magnitudes would give other images
        raise LoraError(f"{file} is a DoRA adapter ({len(dora)} dora_scale keys, e.g. {dora[0]}): diffrt merges "
                        "plain LoRAs only")  # fmt: skip
    check_tensors(tensors, file)
    try:
        converted, alphas = model.lora_state_dict(tensors)
    except (ValueError, KeyError, RuntimeError, IndexError) as err:  # diffusers' kohya converter on odd keys
        raise LoraError(f"{file}: diffusers could not read its keys as a LoRA: {type(err).__name__}: {err}") from err
    alphas = alphas or {}
    located = {key: _locate(key) for key in converted}
    unmatched = [k for k, where in located.items() if where is None and not k.endswith(".alpha")]
    factors = {}
    for where in sorted({w for w in located.values() if w is not None}):  # "the first mismatch": a fixed order
        part, module, down_key, up_key = where
        if down_key not in converted or up_key not in converted:
            unmatched.extend(k for k in (down_key, up_key) if k in converted)  # half a factor adapts nothing
            continue
        found = layer(components, part, module)
        if found is None:
            unmatched.extend((down_key, up_key))
            continue
        alpha, rs = _alpha(alphas, settings.get(part, {}), part, module, down_key)
        factor = _checked(Factor(part, found[0], converted[down_key], converted[up_key], alpha, rs), found[1], file)
        factors[factor.target] = factor
    return dict(sorted(factors.items())), sorted(unmatched)


_FACTOR_ENDINGS = ("lora_A.weight", "lora_B.weight", "down.weight", "up.weight")  # PEFT, diffusers and kohya keys


def check_tensors(tensors: dict, file: Path) -> None:
    """Every tensor of a LoRA file checked before anything is converted or written: floats, finite, factors
    2-D or 4-D and non-empty (rank >= 1), alphas one positive number each; the file and the key named."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise LoraError(f"{file}: {key} holds {value.dtype} values; a LoRA's factors and alphas are floats")
        if not bool(torch.isfinite(value).all()):
            raise LoraError(f"{file}: {key} holds NaN or inf values")
        if key.endswith(".alpha"):
            if value.numel() != 1:
                raise LoraError(f"{file}: {key} has shape {tuple(value.shape)}; an alpha is one number per layer")
            if not 0 < float(value) <= MAX_ALPHA:
                raise LoraError(f"{file}: {key} is {float(value):g}; an alpha is in (0, {MAX_ALPHA:g}]")
        elif key.endswith(_FACTOR_ENDINGS) and (value.dim() not in (2, 4) or 0 in value.shape):
            raise LoraError(f"{file}: {key} has shape {tuple(value.shape)}; a LoRA factor is a non-empty 2-D "
                            "(linear) or 4-D (convolution) matrix")  # fmt: skip


def _locate(key: str):
    """(part, module, down key, up key) of a factor key in diffusers' naming, else None."""
    part, _, rest = key.partition(".")
    if part not in PARTS:
        return None
    for down, up in _FACTOR_SUFFIXES:
        for suffix in (down, up):
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                return part, module, f"{part}.{module}{down}", f"{part}.{module}{up}"
    match = _PROCESSOR_KEY.match(rest)
    if match:
        layers = _PROCESSOR_LAYERS["text" if part.startswith("text_encoder") else "denoiser"]
        module = f"{match['parent']}.{layers[match['proj']]}"
        stem = key[: -len(f"{match['kind']}.weight")]
        return part, module, f"{stem}down.weight", f"{stem}up.weight"
    return None


def layer(components, part: str, module: str) -> tuple[str, nn.Module] | None:
    """The adapted layer (its path as found, the module), or None when the model has no such layer."""
    root = _part_module(components, part)
    if root is None:
        return None
    # transformers' CLIPTextModel no longer nests text_model in every version; files name it either way
    for path in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        try:
            found = root.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, (nn.Linear, nn.Conv2d)):
            return path, found
    return None


def _part_module(components, part: str) -> nn.Module | None:
    if part in ("unet", "transformer"):
        return components.denoiser if components.denoiser_name == part else None
    index = 0 if part == "text_encoder" else 1
    return components.text_encoders[index] if index < len(components.text_encoders) else None


def _alpha(alphas: dict, settings: dict, part: str, module: str, down_key: str):
    """(alpha, rank-stabilized) of one layer: kohya's per-layer alpha, else PEFT's saved lora_alpha."""
    stem = down_key.removesuffix(".down.weight").removesuffix(".lora")
    for key in (f"{down_key}.alpha", f"{stem}.alpha", f"{part}.{module}.alpha"):
        if key in alphas:
            return float(alphas[key]), False  # one number: checked before conversion
    alpha = settings.get("lora_alpha")
    for pattern, value in (settings.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
    return (None if alpha is None else float(alpha)), bool(settings.get("use_rslora", False))


def _checked(factor: Factor, layer: nn.Module, file: Path) -> Factor:
    """The factor with down/up shaped for ``layer`` (1x1 convolutions and linears interchange), or a clear
    error naming the layer and both shapes."""
    weight = layer.weight
    where = f"{file}: layer {factor.part}.{factor.module}"
    down, up = factor.down, factor.up
    if down.shape[0] != up.shape[1]:
        raise LoraError(f"{where}: down has rank {down.shape[0]} but up has rank {up.shape[1]} "
                        f"(shapes {tuple(down.shape)} and {tuple(up.shape)})")  # fmt: skip
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise LoraError(f"{where}: an up factor must be 1x1, got {tuple(up.shape)}")
    if isinstance(layer, nn.Linear) or weight.shape[2:] == (1, 1):
        down, up = down.flatten(1), up.flatten(1)
    kernel_ok = down.dim() == 2 or down.shape[2:] == weight.shape[2:]
    if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel() or not kernel_ok:
        raise LoraError(f"{where} has weight {tuple(weight.shape)}, but the LoRA's factors are "
                        f"up {tuple(factor.up.shape)} @ down {tuple(factor.down.shape)}: a LoRA for another "
                        "architecture?")  # fmt: skip
    device = weight.device
    return Factor(factor.part, factor.module, down.to(device, torch.float32), up.to(device, torch.float32),
                  factor.alpha, factor.rs)  # fmt: skip


# ----------------------------------------------------------------------------------------------- applying
class Adapters:
    """The adapters loaded into one pipeline and the weights they are merged into.

    ``write(part, {module: weight})`` puts merged weights where the backend runs them; every change here is
    computed in full before anything is written, so a failed load leaves the weights as they were."""

    def __init__(self, components, write, in_place: bool = False):
        if components.deployed:
            raise LoraError("a deployed export holds no torch weights to merge a LoRA into: load the model it was "
                            "exported from (diffrt.load(MODEL, backend=...)) to use LoRAs")  # fmt: skip
        self.components = components
        self.write, self.in_place = write, in_place  # in_place: each write goes straight into the parameters
        self.loaded: dict[str, Adapter] = {}
        self._base: dict[tuple[str, str], torch.Tensor] = {}  # the weights as loaded, for every touched layer

    def info(self) -> dict[str, dict]:
        return {name: adapter.info() for name, adapter in self.loaded.items()}

    def load(self, path, name: str | None = None, scale: float = 1.0) -> Adapter:
        file = adapter_file(path)
        name = file.parent.name if name is None and file.name == FOLDER_FILE else name or file.stem
        if name in self.loaded:
            raise LoraError(f"a LoRA named {name!r} is already loaded (from {self.loaded[name].path}); give another "
                            "name= or unload_lora it first")  # fmt: skip
        scale = _check_scale(name, scale)
        tensors, settings = read(file)
        factors, unmatched = parse(self.components, tensors, settings, file)
        if not factors:
            listed = ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
            raise LoraError(f"{file}: no key adapts a layer of this {self.components.family} model "
                            f"({len(unmatched)} keys, e.g. {listed})")  # fmt: skip
        if unmatched:
            log.warning("%s: %d keys adapt no layer of this model and are ignored: %s", file, len(unmatched),
                        ", ".join(unmatched[:20]))  # fmt: skip
        adapter = Adapter(name, file, factors, scale)
        self._apply({**self.loaded, name: adapter}, set(factors))
        self.loaded[name] = adapter
        return adapter

    def set(self, scales: dict[str, float]) -> None:
        """Set the scale of each named adapter (0 disables one); adapters not named keep theirs."""
        unknown = sorted(set(scales) - set(self.loaded))
        if unknown:
            raise LoraError(f"no LoRA named {', '.join(map(repr, unknown))} is loaded; loaded: "
                            f"{', '.join(self.loaded) or 'none'}")  # fmt: skip
        scales = {name: _check_scale(name, value) for name, value in scales.items()}
        touched = {t for name in scales for t in self.loaded[name].factors}
        adapters = {name: _rescaled(a, scales.get(name, a.scale)) for name, a in self.loaded.items()}
        self._apply(adapters, touched)
        self.loaded = adapters

    def unload(self, name: str) -> None:
        if name not in self.loaded:
            raise LoraError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(self.loaded) or 'none'}")
        rest = {k: a for k, a in self.loaded.items() if k != name}
        self._apply(rest, set(self.loaded[name].factors))
        self.loaded = rest

    def _apply(self, adapters: dict[str, Adapter], targets: set) -> None:
        """Write the merged weights of ``targets`` under ``adapters``: a layer at a time where the backend writes
        into the parameters themselves (only one merged layer in memory beside the base copies: an SDXL U-Net
        LoRA on every linear layer needed a second copy of the U-Net when merged all at once), a part at a time
        where each write reopens a graph. A non-finite merge, or a failed write, puts back what was written."""
        new = sorted(t for t in targets if t not in self._base)
        if new:
            self._base.update(kept_copies({t: layer(self.components, *t)[1].weight.detach() for t in new}))
        ordered = sorted(targets)
        groups = [[t] for t in ordered] if self.in_place else [[t for t in ordered if t[0] == part]
                                                                  for part in dict.fromkeys(p for p, _ in ordered)]
        written = []
        try:
            for group in groups:
                for part, weights in self._merged(adapters, set(group)).items():
                    _check_finite(adapters, part, weights)
                    self.write(part, weights)
                written += group
        except Exception:
            for group in groups:  # as before this call, a group at a time
                done = [t for t in group if t in written]
                for part, weights in self._merged(self.loaded, set(done)).items():
                    self.write(part, weights)
            raise

    def _merged(self, adapters: dict[str, Adapter], targets: set) -> dict[str, dict[str, torch.Tensor]]:
        """``{part: {layer: weight}}``: each target's base weight plus its active adapters' updates."""
        updates: dict[str, dict[str, torch.Tensor]] = {}
        for part, module in sorted(targets):
            base = self._base[part, module]
            active = [(a.scale, a.factors[part, module]) for a in adapters.values()
                      if a.scale != 0 and (part, module) in a.factors]  # fmt: skip
            merged = base
            if active:
                merged = base.float()
                for scale, factor in active:
                    merged = merged + scale * factor.delta(base.shape)
                merged = merged.to(base.dtype)
            updates.setdefault(part, {})[module] = merged
        return updates


def kept_copies(weights: dict) -> dict:
    """Copies of ``weights`` (the weights as loaded, kept to restore them exactly when an adapter goes): in memory,
    or, on the CPU where a copy would not fit beside what runs, in a file mapped back (pages the kernel reads on
    demand and can drop; its name is removed at once). SDXL's U-Net in float32 with a LoRA on every linear layer
    ran this 24 GB machine out of memory with the copy in memory (bench realsize)."""
    size = sum(w.numel() * w.element_size() for w in weights.values())
    device = next(iter(weights.values())).device
    if device.type != "cpu" or fits_in_memory(size, device):
        return {key: w.clone() for key, w in weights.items()}
    names = {key: str(i) for i, key in enumerate(weights)}
    handle, path = tempfile.mkstemp(prefix="diffrt-lora-base-", suffix=".pt")
    os.close(handle)
    try:
        torch.save({names[key]: w for key, w in weights.items()}, path)
        mapped = torch.load(path, mmap=True, weights_only=True)
    finally:
        os.unlink(path)  # the mapping outlives the name: no file is left behind
    log.info("LoRA: the %.1f GB of weights as loaded are kept in a mapped file, not in memory", size / 1e9)
    return {key: mapped[names[key]] for key in weights}


def fits_in_memory(size: int, device) -> bool:
    """Whether ``size`` bytes fit in half the memory ``device`` has free (the other half: the calls)."""
    from ..core.memory import available_bytes

    return size <= available_bytes(device)[0] // 2


def _check_finite(adapters: dict[str, Adapter], part: str, weights: dict[str, torch.Tensor]) -> None:
    for module, weight in weights.items():
        if not bool(torch.isfinite(weight).all()):
            scales = ", ".join(f"{a.name} at {a.scale:g}" for a in adapters.values() if (part, module) in a.factors)
            raise LoraError(f"the LoRA(s) {scales} make the weights of {part}.{module} non-finite in {weight.dtype}: "
                            "lower the scale")  # fmt: skip


def _rescaled(adapter: Adapter, scale: float) -> Adapter:
    return Adapter(adapter.name, adapter.path, adapter.factors, scale)


def _check_scale(name: str, scale) -> float:
    try:
        return number(f"the scale of LoRA {name!r}", scale, -MAX_SCALE, MAX_SCALE)
    except ValueError as err:
        raise LoraError(str(err)) from None


def write_into_modules(components, part: str, weights: dict[str, torch.Tensor]) -> None:
    """Copy merged weights into the model's own parameters (same storage: no recompile, no re-capture)."""
    with torch.no_grad():
        for module, weight in weights.items():
            layer(components, part, module)[1].weight.copy_(weight)


def parse_spec(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's ``--lora``) as (path, scale)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0
