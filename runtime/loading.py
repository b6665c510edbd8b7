"""Model sources -> the parts a pipeline needs.

A source is a local diffusers folder (``model_index.json``) or a preset name (:mod:`diffrt.presets`).
Loading is offline (``local_files_only``), reads safetensors only (never pickle) and never runs remote code.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "BertModel")
DEFAULTS_FILE = "diffrt.json"  # optional per-folder sampling defaults: steps, sampler, guidance, ...
BUILTIN_DEFAULTS = {"steps": 20, "sampler": "dpmpp_2m", "guidance": 7.5}


@dataclass
class Components:
    """The modules of one text-to-image model and what the pipeline needs to know about them."""

    name: str
    family: str  # "sd" (one text encoder) or "sdxl" (two, pooled embeddings, size conditioning)
    unet: object
    vae: object
    text_encoders: list
    tokenizers: list
    scheduler: object  # the folder's diffusers scheduler: training schedule and prediction type only
    random_weights: bool = False
    defaults: dict = field(default_factory=lambda: dict(BUILTIN_DEFAULTS))
    path: Path | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def inpainting_unet(self) -> bool:
        """An inpainting U-Net takes latents + mask + masked-image latents (4 + 1 + 4 channels)."""
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def prediction_type(self) -> str:
        if self.is_flow:
            return "flow"
        return self.scheduler.config.prediction_type

    @property
    def is_flow(self) -> bool:
        return type(self.scheduler).__name__.startswith("FlowMatch")

    @property
    def is_consistency(self) -> bool:
        return type(self.scheduler).__name__ == "LCMScheduler"


def load_components(source: str | os.PathLike, dtype=None) -> Components:
    """Load an embedded model or a preset (by name) or a local diffusers folder; ``dtype`` is the modules' torch
    dtype. Names win over folders: load a local folder called ``fashion`` as ``./fashion``."""
    from . import embedded, presets

    if isinstance(source, str) and source in embedded.NAMES:
        return embedded.load(source, dtype)
    if isinstance(source, str) and source in presets.PRESETS:
        return _from_preset(presets.PRESETS[source], dtype)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(source)!r} is neither an embedded model ({', '.join(embedded.NAMES)}), "
            f"a preset ({', '.join(presets.names())}) nor an existing folder"
        )
    return _from_folder(path, dtype)


def _from_preset(preset, dtype) -> Components:
    from .presets import build_modules

    log.warning("preset %r: %s", preset.name, preset.notes)
    unet, vae, encoders, tokenizers, scheduler = build_modules(preset)
    if dtype is not None and dtype != unet.dtype:
        for module in (unet, vae, *encoders):
            module.to(dtype)
    return Components(
        preset.name, preset.family, unet, vae, encoders, tokenizers, scheduler,
        random_weights=True, defaults=dict(preset.defaults),
    )  # fmt: skip


def _read_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers folder: it has no model_index.json")
    try:
        return json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_file} is not valid JSON: {err}") from err


def _component_class(index: dict, name: str, path: Path) -> str:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise ValueError(f"{path}/model_index.json has no {name!r} component")
    if not (path / name).is_dir():
        raise FileNotFoundError(f"{path} lists {name!r} in model_index.json but has no {name}/ folder")
    return entry[1]


def _require_safetensors(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")) or any(folder.glob("*.pt")):
        raise ValueError(
            f"{folder} has only pickle weights (.bin/.ckpt/.pt); diffrt loads safetensors only "
            "(convert them, e.g. with diffusers' save_pretrained(safe_serialization=True))"
        )
    raise FileNotFoundError(f"{folder} has no .safetensors weights file")


def _load(what: str, folder: Path, loader):
    """Run a from_pretrained call, turning library errors about broken files into one clear error."""
    try:
        return loader()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"could not load the {what} from {folder}: {type(err).__name__}: {err}") from err


def _from_folder(path: Path, dtype) -> Components:
    import diffusers
    import transformers

    index = _read_index(path)
    pipeline_class = index.get("_class_name")
    if pipeline_class not in FAMILIES:
        raise ValueError(
            f"unsupported model family {pipeline_class!r} in {path}/model_index.json; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES[pipeline_class]
    common = dict(local_files_only=True, use_safetensors=True)

    def diffusers_model(name, expected):
        cls = _component_class(index, name, path)
        if cls != expected:
            raise ValueError(f"{path}: {name} is a {cls}; diffrt supports {expected}")
        _require_safetensors(path / name)
        model_class = getattr(diffusers, expected)
        return _load(name, path / name, lambda: model_class.from_pretrained(path / name, torch_dtype=dtype, **common))

    unet = diffusers_model("unet", "UNet2DConditionModel")
    vae = diffusers_model("vae", "AutoencoderKL")

    encoders, tokenizers = [], []
    suffixes = ["", "_2"] if family == "sdxl" else [""]
    for suffix in suffixes:
        cls = _component_class(index, "text_encoder" + suffix, path)
        if cls not in TEXT_ENCODER_CLASSES:
            raise ValueError(f"{path}: text_encoder{suffix} is a {cls}; supported: {', '.join(TEXT_ENCODER_CLASSES)}")
        folder = path / ("text_encoder" + suffix)
        _require_safetensors(folder)
        model_class = getattr(transformers, cls)
        encoders.append(
            _load(
                "text_encoder" + suffix,
                folder,
                lambda mc=model_class, f=folder: mc.from_pretrained(f, dtype=dtype, trust_remote_code=False, **common),
            ).eval()
        )
        tok_cls = _component_class(index, "tokenizer" + suffix, path)
        tok_class = getattr(transformers, tok_cls, None)
        if tok_class is None or "Tokenizer" not in tok_cls:
            raise ValueError(f"{path}: tokenizer{suffix} class {tok_cls!r} is not a transformers tokenizer")
        tok_folder = path / ("tokenizer" + suffix)
        tokenizer = _load("tokenizer" + suffix, tok_folder, lambda c=tok_class, f=tok_folder: c.from_pretrained(f))
        tokenizers.append(tokenizer)

    sched_cls = _component_class(index, "scheduler", path)
    sched_class = getattr(diffusers, sched_cls, None)
    if sched_class is None or not sched_cls.endswith("Scheduler"):
        raise ValueError(f"{path}: scheduler class {sched_cls!r} is not a diffusers scheduler")
    scheduler = _load("scheduler", path / "scheduler", lambda: sched_class.from_pretrained(path / "scheduler"))

    defaults = dict(BUILTIN_DEFAULTS)
    if (path / DEFAULTS_FILE).is_file():
        defaults.update(json.loads((path / DEFAULTS_FILE).read_text()))
    return Components(
        path.name, family, unet.eval(), vae.eval(), encoders, tokenizers, scheduler, defaults=defaults, path=path
    )


def save_components(components: Components, folder: str | os.PathLike) -> Path:
    """Write the components as a diffusers folder (safetensors) that diffusers' pipelines also load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class = "StableDiffusionXLPipeline" if components.family == "sdxl" else "StableDiffusionPipeline"
    index = {"_class_name": pipeline_class, "_diffusers_version": _diffusers_version()}
    components.unet.save_pretrained(folder / "unet", safe_serialization=True)
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    suffixes = ["", "_2"][: len(components.text_encoders)]
    for suffix, encoder, tokenizer in zip(suffixes, components.text_encoders, components.tokenizers, strict=True):
        encoder.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=True)
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", type(encoder).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", type(tokenizer).__name__]
    components.scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(components.scheduler).__name__]
    if components.family == "sd":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        index["image_encoder"] = [None, None]
    else:
        index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / DEFAULTS_FILE).write_text(json.dumps(components.defaults, indent=2))
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
