"""Diffusers folders: read one into :class:`~diffrt.models.components.Components`, write one that diffusers' own
pipelines load.

Offline (``local_files_only``), safetensors only (never pickle), never remote code. The folder's family comes
from its ``model_index.json`` pipeline class (:mod:`diffrt.models.families`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from pathlib import Path

from ..core import defaults
from ..core.files import read_json_object
from . import families
from .components import Components, class_name

log = logging.getLogger(__name__)

SAFE = dict(local_files_only=True, use_safetensors=True)


def require_safetensors(folder: Path) -> None:
    """A clear error unless ``folder`` holds safetensors weights (pickle-only folders are refused)."""
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")) or any(folder.glob("*.pt")):
        raise ValueError(
            f"{folder} has only pickle weights (.bin/.ckpt/.pt); diffrt loads safetensors only "
            "(convert them, e.g. with diffusers' save_pretrained(safe_serialization=True))"
        )
    raise FileNotFoundError(f"{folder} has no .safetensors weights file")


@contextlib.contextmanager
def no_progress_bars():
    """transformers' and diffusers' "Loading weights" bars off for a load, then back as they were: a
    second-long load of local files is not the user's business (their warnings still show)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(lib, lib.is_progress_bar_enabled()) for lib in (transformers_logging, diffusers_logging)]
    for lib, _ in was:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in was:
            if enabled:
                lib.enable_progress_bar()


def load_part(what: str, folder: Path, loader):
    """Run a from_pretrained call, turning library errors about broken files into one clear error."""
    try:
        with no_progress_bars():
            return loader()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"could not load the {what} from {folder}: {type(err).__name__}: {err}") from err


def load_model(model_class, folder: Path, what: str, dtype=None):
    """A diffusers model class's safetensors weights from ``folder``, offline."""
    require_safetensors(folder)
    return load_part(what, folder, lambda: model_class.from_pretrained(folder, torch_dtype=dtype, **SAFE)).eval()


def read_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers folder: it has no model_index.json")
    return read_json_object(index_file)


def component_class(index: dict, name: str, path: Path) -> str:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise ValueError(f"{path}/model_index.json has no {name!r} component")
    if not (path / name).is_dir():
        raise FileNotFoundError(f"{path} lists {name!r} in model_index.json but has no {name}/ folder")
    return entry[1]


def load_folder(path: str | os.PathLike, dtype=None) -> Components:
    """A local diffusers folder (U-Net or transformer families) as Components; ``dtype`` is the modules' torch
    dtype. A text encoder the family may lack (SD3's T5) can be an empty entry in model_index.json."""
    import diffusers

    path = Path(path)
    index = read_index(path)
    family = families.for_pipeline_class(index.get("_class_name"), f"{path}/model_index.json")

    def diffusers_model(name, expected: tuple[str, ...]):
        cls = component_class(index, name, path)
        if cls not in expected:
            raise ValueError(f"{path}: {name} is a {cls}; diffrt supports {' or '.join(expected)}")
        return load_model(getattr(diffusers, cls), path / name, name, dtype)

    denoiser = diffusers_model(family.denoiser_part, family.denoiser_classes)
    vae = diffusers_model("vae", ("AutoencoderKL",))
    encoders, tokenizers = [], []
    for part in family.text_encoder_parts:
        if part in family.optional_parts and index.get(part) in (None, [None, None]):
            continue
        encoder, tokenizer = _text_encoder(index, path, part, family, dtype)
        encoders.append(encoder)
        tokenizers.append(tokenizer)
    scheduler = as_pipeline_sets(_scheduler(index, path), index["_class_name"], family)
    unet, transformer = (denoiser, None) if family.denoiser_part == "unet" else (None, denoiser)
    components = Components(path.name, family.name, unet, vae, encoders, tokenizers, scheduler, path=path,
                            transformer=transformer)  # fmt: skip
    family.bind(components).check_components(path)
    components.defaults, components.default_sources = folder_defaults(components, index["_class_name"], path)
    return components


# The pipeline's __call__ arguments whose defaults a folder gives: diffusers' name -> diffrt's. The size is not
# read here: the families compute it from the denoiser's sample_size as the pipelines do (default_size).
PIPELINE_ARGUMENTS = {"num_inference_steps": "steps", "guidance_scale": "guidance",
                      "max_sequence_length": "max_sequence_length"}  # fmt: skip


def folder_defaults(components: Components, pipeline_class: str, path: Path) -> tuple[dict, dict]:
    """(defaults, sources) of a folder: its ``diffrt.json``; then what diffusers' own pipeline would use: the
    folder's scheduler (sampler ``"scheduler"``, when ``from_diffusers`` reproduces it at these defaults) and
    the pipeline class's ``__call__`` defaults (steps, guidance, T5 length), as the family reads them; then
    diffrt's built-ins."""
    pipeline = families.model(components).call_defaults(pipeline_defaults(pipeline_class))
    own = {"sampler": defaults.SCHEDULER} if _reproducible(components, pipeline, path) else {}
    return defaults.layered((defaults.FILE_SOURCE, defaults.read_file(path)),
                            (f"the folder's {pipeline_class}", pipeline),
                            (f"the folder's {class_name(components.scheduler)}", own))  # fmt: skip


def pipeline_defaults(pipeline_class: str) -> dict:
    """The defaults of diffusers pipeline ``pipeline_class``'s ``__call__`` that diffrt takes (PIPELINE_ARGUMENTS),
    read from its signature: numbers only ({} for a class this diffusers lacks)."""
    import diffusers

    pipeline = getattr(diffusers, pipeline_class, None)
    if pipeline is None:
        return {}
    parameters = inspect.signature(pipeline.__call__).parameters
    found = {}
    for argument, key in PIPELINE_ARGUMENTS.items():
        value = parameters[argument].default if argument in parameters else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = value
    return found


def _reproducible(components: Components, pipeline: dict, path: Path) -> bool:
    """Whether ``from_diffusers`` reproduces the folder's scheduler at the default step count and size; if not,
    a warning says so and the folder samples with diffrt's default sampler on its noise schedule."""
    from .. import samplers

    scheduler, model = components.scheduler, families.model(components)
    steps, size = pipeline.get("steps", defaults.BUILTIN["steps"]), model.default_size()
    try:
        samplers.from_diffusers(scheduler, steps, **model.timestep_options(scheduler, steps, size, size))
    except ValueError as err:
        log.warning("%s: diffrt cannot sample as its %s does (%s); it samples with diffrt's %s instead", path,
                    class_name(scheduler), err, defaults.BUILTIN["sampler"])  # fmt: skip
        return False
    return True


def _text_encoder(index: dict, path: Path, part: str, family, dtype):
    import transformers

    cls = component_class(index, part, path)
    if cls not in family.text_encoder_classes:
        raise ValueError(f"{path}: {part} is a {cls}; supported: {', '.join(family.text_encoder_classes)}")
    folder = path / part
    require_safetensors(folder)
    model_class = getattr(transformers, cls)
    encoder = load_part(part, folder, lambda: model_class.from_pretrained(folder, dtype=dtype, trust_remote_code=False,
                                                                          **SAFE))  # fmt: skip
    tokenizer_part = part.replace("text_encoder", "tokenizer")
    tok_cls = component_class(index, tokenizer_part, path)
    tok_class = getattr(transformers, tok_cls, None)
    if tok_class is None or "Tokenizer" not in tok_cls:
        raise ValueError(f"{path}: {tokenizer_part} class {tok_cls!r} is not a transformers tokenizer")
    tok_folder = path / tokenizer_part
    return encoder.eval(), load_part(tokenizer_part, tok_folder, lambda: tok_class.from_pretrained(tok_folder))


def as_pipeline_sets(scheduler, pipeline_class: str, family):
    """The scheduler as the folder's pipeline class runs it: SD 1.x/2.x's pipelines rewrite an outdated config
    when they are built (``steps_offset`` to 1, ``clip_sample`` to False), so diffrt does too."""
    if pipeline_class not in family.scheduler_fixing_pipelines:
        return scheduler
    fixes = {}
    if scheduler.config.get("steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if scheduler.config.get("clip_sample", False) is True:
        fixes["clip_sample"] = False
    if fixes:
        log.info("%s: its %s config is outdated; %s as diffusers' %s sets it", pipeline_class,
                 type(scheduler).__name__, fixes, pipeline_class)  # fmt: skip
    return type(scheduler).from_config(scheduler.config, **fixes) if fixes else scheduler


def _scheduler(index: dict, path: Path):
    import diffusers

    sched_cls = component_class(index, "scheduler", path)
    sched_class = getattr(diffusers, sched_cls, None)
    if sched_class is None or not sched_cls.endswith("Scheduler"):
        raise ValueError(f"{path}: scheduler class {sched_cls!r} is not a diffusers scheduler")
    return load_part("scheduler", path / "scheduler", lambda: sched_class.from_pretrained(path / "scheduler"))


def save_folder(components: Components, folder: str | os.PathLike) -> Path:
    """Write the components as a diffusers folder (safetensors) that diffusers' pipelines also load. A text
    encoder the model lacks (SD3 without T5) is written as an empty entry, as diffusers writes it. Quietly:
    transformers' "Writing model shards" bars are off while it writes."""
    with no_progress_bars():
        return _write_folder(components, folder)


def _write_folder(components: Components, folder: str | os.PathLike) -> Path:
    import diffusers

    family = families.get(components.family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": family.save_class, "_diffusers_version": diffusers.__version__}
    for part, model in ((family.denoiser_part, components.denoiser), ("vae", components.vae)):
        model.save_pretrained(folder / part, safe_serialization=True)
        index[part] = ["diffusers", type(model).__name__]
    for k, part in enumerate(family.text_encoder_parts):
        tokenizer_part = part.replace("text_encoder", "tokenizer")
        if k >= len(components.text_encoders):
            index[part] = index[tokenizer_part] = [None, None]
            continue
        components.text_encoders[k].save_pretrained(folder / part, safe_serialization=True)
        components.tokenizers[k].save_pretrained(folder / tokenizer_part)
        index[part] = ["transformers", type(components.text_encoders[k]).__name__]
        index[tokenizer_part] = ["transformers", type(components.tokenizers[k]).__name__]
    components.scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(components.scheduler).__name__]
    index.update(family.index_extras)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / defaults.DEFAULTS_FILE).write_text(json.dumps(components.defaults, indent=2))
    return folder
