"""Deployed exports: a folder of exported graphs that a pipeline runs from alone, without diffusers,
transformers or the torch modules.

``diffrt export MODEL --format onnx --out DIR`` writes, beside the graphs and ``manifest.json``, what the
pipeline reads off a loaded model: ``deployment.json`` (the family, each part's class and config, the training
schedule and prediction type, the sampling defaults and their sources, and for models that sample on their
scheduler's own timesteps (consistency models, a diffusers folder's "scheduler" default) the sampler and grid
``from_diffusers`` gave at every step count it allows) and one ``tokenizer_K.json`` per tokenizer (the
``tokenizers`` library's format). The manifest records their SHA-256 like the graphs'. :func:`load` turns such
a folder into :class:`~diffrt.models.components.Components` whose modules are config-only stand-ins
(:class:`ModuleFacts`): the exported-graph backends read only the configs, tokenization goes through
:class:`~diffrt.core.text.SavedTokenizer`.

Transformer families (SD3, FLUX.1) are not deployable yet: their flow grids come from diffusers' scheduler at
each image size; their exports carry no deployment record and load with the model beside them (``onnx_dir=``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.files import atomic_write_bytes
from ..core.version import __version__
from . import artifacts, families
from .components import Components, class_name

FORMAT = 1  # bump when what deployment.json holds changes meaning; a newer one is refused by older diffrt
DEPLOYMENT = "deployment.json"
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class Config(dict):
    """A saved module config, read as diffusers' (``config.key``, ``config.get(key)``) and transformers' are."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ModuleFacts:
    """A model part that is not built: its class name and config, what the exported-graph backends read."""

    def __init__(self, class_name: str, config: dict):
        self.class_name, self.config = class_name, Config(config)

    def __repr__(self):
        return f"ModuleFacts({self.class_name})"


class SavedScheduler(ModuleFacts):
    """The training schedule: ``alphas_cumprod`` and the config, and for models that sample on their
    scheduler's own timesteps (consistency models; folders whose default sampler is ``"scheduler"``) what
    ``from_diffusers`` gave at export, per step count: the sampler, its options and the grids."""

    def __init__(self, class_name: str, config: dict, alphas_cumprod, grids: dict | None, sampler: dict | None = None):
        import torch

        super().__init__(class_name, config)
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)
        self.grids = grids or {}
        if sampler is None and class_name == "LCMScheduler":  # records written before the sampler was kept
            sampler = {"name": "lcm", "options": {}}
        self.sampler = sampler

    def tabulated(self, steps: int):
        """``from_diffusers(scheduler, steps)`` as read at export, or None when that step count was not
        tabulated (``from_diffusers`` then rebuilds the diffusers scheduler from the config)."""
        from ..core.schedules import Grid

        grid = self.grids.get(str(steps))
        if grid is None or self.sampler is None:
            return None
        grid = Grid(**{**_tensors(grid), "init_scale": grid["init_scale"], "kind": grid["kind"]})
        return self.sampler["name"], grid, _decode_options(self.sampler["options"])


def _encode_options(options: dict) -> dict:
    """Sampler options as JSON: a torch dtype (an SDE's ``noise_dtype``) by its name."""
    import torch

    return {key: {"dtype": str(value).removeprefix("torch.")} if isinstance(value, torch.dtype) else value
            for key, value in options.items()}  # fmt: skip


def _decode_options(options: dict) -> dict:
    import torch

    return {k: getattr(torch, v["dtype"]) if isinstance(v, dict) else v for k, v in options.items()}


def _tensors(grid: dict) -> dict:
    import torch

    return {k: torch.tensor(grid[k], dtype=torch.float64) for k in ("alphas", "sigmas", "timesteps")}


# ------------------------------------------------------------------------------------------------- writing
def unsupported(components) -> str | None:
    """Why ``components`` cannot be deployed (None: it can)."""
    if families.model(components).uses_scheduler_grid() and not components.is_consistency:
        return (f"the {components.family} family samples on its scheduler's flow grids, which need diffusers at "
                f"each image size")  # fmt: skip
    if components.controlnets:
        return "its ControlNets are not part of a deployment record yet"
    return None


def write(components, folder: Path) -> dict:
    """Write ``deployment.json`` and the tokenizer files into ``folder`` (each to a temporary name, then
    renamed); returns the manifest's ``deployment`` record, with their file records."""
    from ..core.text import SavedTokenizer

    reason = unsupported(components)
    if reason is not None:
        raise ValueError(f"{components.name} cannot be deployed without diffusers: {reason}")
    records = []
    tokenizers = []
    for k, tokenizer in enumerate(components.tokenizers):
        saved = SavedTokenizer.from_transformers(tokenizer)
        name = f"tokenizer_{k}.json"
        atomic_write_bytes(folder / name, saved.to_str().encode())
        records.append(artifacts.file_record(folder / name))
        tokenizers.append({"file": name, **saved.settings()})
    payload = {
        "format": FORMAT, "diffrt": __version__, "name": components.name, "family": components.family,
        "random_weights": components.random_weights, "defaults": components.defaults,
        "default_sources": components.default_sources,
        "denoiser": {"part": components.denoiser_name, **_facts(components.denoiser)},
        "vae": _facts(components.vae), "text_encoders": [_facts(e) for e in components.text_encoders],
        "scheduler": scheduler_record(components), "tokenizers": tokenizers,
    }  # fmt: skip
    atomic_write_bytes(folder / DEPLOYMENT, json.dumps(payload, indent=1, default=str).encode())
    records.append(artifacts.file_record(folder / DEPLOYMENT))
    return {"format": FORMAT, "diffrt": __version__, "files": records}


def _facts(module) -> dict:
    config = module.config
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {"class": class_name(module), "config": json.loads(json.dumps(raw, default=str))}


TABULATED_STEPS = 100  # a "scheduler" default's grids are kept for 1..this many steps (more: diffusers rebuilds it)


def scheduler_record(components) -> dict:
    """The training schedule as deployment.json holds it, and for models that sample on their scheduler's own
    timesteps (consistency models, a folder's "scheduler" default) what from_diffusers gives per step count."""
    from .. import samplers
    from ..core import defaults

    scheduler = components.scheduler
    record = {"class": class_name(scheduler), "config": json.loads(json.dumps(dict(scheduler.config), default=str))}
    acp = getattr(scheduler, "alphas_cumprod", None)
    record["alphas_cumprod"] = None if acp is None else [float(a) for a in acp]
    if components.is_consistency:  # LCM: its own timesteps, for every step count a call may ask for
        steps = int(scheduler.config.get("original_inference_steps") or 50)
    elif components.defaults.get("sampler") == defaults.SCHEDULER:
        steps = TABULATED_STEPS
    else:
        return record
    grids, sampler = {}, None
    for n in range(1, steps + 1):
        try:
            name, grid, options = samplers.from_diffusers(scheduler, n)
        except ValueError:  # a step count this scheduler cannot take: refused at call time, as before export
            continue
        sampler = {"name": name, "options": _encode_options(options)}
        grids[str(n)] = {"alphas": grid.alphas.tolist(), "sigmas": grid.sigmas.tolist(),
                         "timesteps": grid.timesteps.tolist(), "init_scale": grid.init_scale, "kind": grid.kind}
    record.update(grids=grids, sampler=sampler)  # fmt: skip
    return record


# ------------------------------------------------------------------------------------------------- reading
def export_manifest(path) -> dict | None:
    """The (unverified) manifest when ``path`` is an export folder, deployable or not; else None."""
    manifest = artifacts.read_manifest(path) if Path(path).is_dir() else None
    return manifest if manifest is not None and manifest.get("kind") in artifacts.KINDS else None



def open_deployment(folder) -> tuple[dict, dict]:
    """(manifest, deployment.json) of an export folder, every file verified before anything is read."""
    folder = Path(folder)
    manifest = artifacts.read_manifest(folder) or {}
    versions = manifest.get("versions")
    made = versions.get("diffrt", "?") if isinstance(versions, dict) else "?"
    if isinstance(manifest.get("format"), int) and manifest["format"] > artifacts.EXPORT_FORMAT:
        raise artifacts.ArtifactError(
            f"{folder} was exported by diffrt {made} (export format {manifest['format']}); this diffrt {__version__} "
            f"reads format {artifacts.EXPORT_FORMAT}: upgrade diffrt"
        )
    kind = manifest.get("kind") if manifest.get("kind") in artifacts.KINDS else "onnx"
    manifest = artifacts.open_folder(folder, kind)  # every graph verified
    record = manifest.get("deployment")
    if record is None:
        raise artifacts.ArtifactError(
            f"{folder} holds exported graphs but no deployment record, so it cannot run without the model: "
            f"load the model and pass onnx_dir={str(folder)!r} (transformer families are not deployable yet; "
            "U-Net exports made by diffrt export have one)"
        )
    artifacts.checked_fields(record, {"format": int, "files": list}, f"{folder}/manifest.json: deployment")
    for k, file in enumerate(record["files"]):
        artifacts.checked_fields(file, artifacts.FILE_RECORD, f"{folder}/manifest.json: deployment.files[{k}]")
    if record["format"] > FORMAT:
        raise artifacts.ArtifactError(f"{folder} was deployed by diffrt {record.get('diffrt', '?')} (deployment "
                                      f"format {record.get('format')!r}); this diffrt {__version__} reads format "
                                      f"{FORMAT}: upgrade diffrt")  # fmt: skip
    names = {r["file"] for r in record["files"]}
    if DEPLOYMENT not in names:
        raise artifacts.ArtifactError(f"{folder}: its manifest's deployment record lists no {DEPLOYMENT}")
    problem = artifacts.verify_files(folder, record["files"])
    if problem:
        raise artifacts.ArtifactError(f"refusing to load the deployment: {problem}")
    deployment = json.loads((folder / DEPLOYMENT).read_text())
    _check_record(deployment, folder / DEPLOYMENT)
    missing = [t["file"] for t in deployment["tokenizers"] if t["file"] not in names]
    if missing:
        raise artifacts.ArtifactError(f"{folder}: its tokenizer file(s) {missing} are not in its manifest")
    return manifest, deployment


def load(folder, dtype=None) -> Components:
    """The Components of a deployed export folder (config-only parts, saved tokenizers and schedule);
    ``dtype``, when given, must be the export's precision."""
    from ..core.text import SavedTokenizer

    folder = Path(folder)
    manifest, deployment = open_deployment(folder)
    precision = manifest["precision"]
    if dtype is not None and str(dtype).removeprefix("torch.") != PRECISION_DTYPES[precision]:
        raise ValueError(f"{folder} holds {precision} graphs: load it with dtype {PRECISION_DTYPES[precision]} "
                         f"(or export again with --precision for {str(dtype).removeprefix('torch.')})")  # fmt: skip
    tokenizers = []
    for saved in deployment["tokenizers"]:
        text = (folder / saved["file"]).read_text()
        tokenizers.append(SavedTokenizer(text, saved["model_max_length"], saved["pad_id"], saved["pad_token"]))
    denoiser = ModuleFacts(deployment["denoiser"]["class"], deployment["denoiser"]["config"])
    unet, transformer = (denoiser, None) if deployment["denoiser"]["part"] == "unet" else (None, denoiser)
    sched = deployment["scheduler"]
    scheduler = SavedScheduler(sched["class"], sched["config"], sched["alphas_cumprod"], sched.get("grids"),
                               sched.get("sampler"))  # fmt: skip
    encoders = [ModuleFacts(e["class"], e["config"]) for e in deployment["text_encoders"]]
    vae = ModuleFacts(deployment["vae"]["class"], deployment["vae"]["config"])
    return Components(deployment["name"], families.get(deployment["family"]).name, unet, vae, encoders, tokenizers,
                      scheduler, random_weights=deployment["random_weights"], defaults=deployment["defaults"],
                      path=folder, transformer=transformer, deployed=manifest,
                      default_sources=deployment.get("default_sources", {}))  # fmt: skip


PART = {"class": str, "config": dict}
RECORD_FIELDS = {"name": str, "family": str, "random_weights": bool, "defaults": dict, "denoiser": dict, "vae": dict,
                 "text_encoders": list, "scheduler": dict, "tokenizers": list}  # fmt: skip
TOKENIZER = {"file": str, "model_max_length": int, "pad_id": int, "pad_token": (str, type(None))}


def _check_record(deployment, where: Path) -> None:
    """deployment.json's fields, each of its type, naming the file and the field."""
    artifacts.checked_fields(deployment, RECORD_FIELDS, str(where))
    artifacts.checked_fields(deployment["denoiser"], {"part": str, **PART}, f"{where}: denoiser")
    artifacts.checked_fields(deployment["vae"], PART, f"{where}: vae")
    for k, encoder in enumerate(deployment["text_encoders"]):
        artifacts.checked_fields(encoder, PART, f"{where}: text_encoders[{k}]")
    scheduler = {**PART, "alphas_cumprod": (list, type(None))}
    artifacts.checked_fields(deployment["scheduler"], scheduler, f"{where}: scheduler")
    for k, tokenizer in enumerate(deployment["tokenizers"]):
        artifacts.checked_fields(tokenizer, TOKENIZER, f"{where}: tokenizers[{k}]")
    if deployment["family"] not in families.FAMILIES:
        raise artifacts.ArtifactError(f"{where}: family {deployment['family']!r} is not one of "
                                      f"{', '.join(families.FAMILIES)}")  # fmt: skip


def precision_dtype(manifest: dict) -> str:
    """The torch dtype name of a deployed folder's graphs (what ``diffrt.load`` uses when none is given)."""
    return PRECISION_DTYPES.get(manifest.get("precision"), "float32")


class FolderSource:
    """The artifact source of a deployed folder: its own graphs at its own precision, verified at load."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder_path, self.manifest = Path(folder), manifest

    def folder(self, precision: str, graphs: list[str]) -> tuple[Path, dict]:
        missing = [g for g in graphs if g not in self.manifest["graphs"]]
        if missing:
            raise artifacts.ArtifactError(f"{self.folder_path} has no {missing} graph(s); it has "
                                          f"{sorted(self.manifest['graphs'])}")  # fmt: skip
        if self.manifest["precision"] != precision:
            raise artifacts.ArtifactError(
                f"{self.folder_path} holds {self.manifest['precision']} graphs only; {precision} ones were asked for "
                f"(the float32 VAE fallback of an fp16 deployment needs an fp32 export, or vae_precision='model')"
            )
        return self.folder_path, self.manifest
