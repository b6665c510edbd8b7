"""Sampling defaults: where what a call leaves unset comes from, in one place.

The order, first wins: the call; the model's ``diffrt.json`` (embedded models and saved presets have one, a
published diffusers folder never does); the folder itself, as diffusers' own pipeline would run it (its
scheduler, reproduced by ``from_diffusers``: sampler ``"scheduler"``; and the defaults of the pipeline class its
``model_index.json`` names: :mod:`diffrt.models.folders` reads them off the class's ``__call__``); a preset's own; and
diffrt's built-ins (``BUILTIN``) for what none of these gives. ``layered`` records the source of each value.
Light on purpose: the command line imports it to print its help without importing torch.
"""

from __future__ import annotations

from pathlib import Path

from .files import read_json_object

DEFAULT_MODEL = "fashion"  # what `diffrt generate` and `diffrt bench fid` use when no model is named
# diffrt.models.embedded's, named here for the CLI help
EMBEDDED_MODELS = ("fashion", "fashion-flow", "fashion-lcm", "fashion-dit")
BACKENDS = ("torch", "triton", "compile", "onnxruntime", "tensorrt")  # diffrt.backends', likewise
SAMPLING_KEYS = ("steps", "sampler", "guidance")
BUILTIN = {"steps": 20, "sampler": "dpmpp_2m", "guidance": 7.5}
DEFAULTS_FILE = "diffrt.json"  # optional per-folder defaults: steps, sampler, guidance (and more keys kept)
# sampler= value: sample exactly as the model's own diffusers scheduler does (its update rule, timesteps and
# options, through diffrt.samplers.from_diffusers); what a published diffusers folder samples with by default
SCHEDULER = "scheduler"
BUILTIN_SOURCE = "diffrt's built-in defaults"
FILE_SOURCE = f"its {DEFAULTS_FILE}"
CALL_SOURCE = "the call"


def layered(*layers: tuple[str, dict | None]) -> tuple[dict, dict]:
    """(values, sources) from ``(label, defaults)`` layers, the first that has a key giving it, diffrt's
    built-ins last; ``sources[key]`` is the label of the layer the value came from."""
    values, sources = {}, {}
    for label, layer in (*layers, (BUILTIN_SOURCE, BUILTIN)):
        for key, value in (layer or {}).items():
            if key not in values:
                values[key], sources[key] = value, label
    return values, sources


def merged(model_defaults: dict | None = None) -> dict:
    """The built-in defaults with a model's own on top."""
    return layered(("the model", model_defaults))[0]


class Defaults(dict):
    """A model's defaults (what a call leaves unset takes), with where each came from (``sources``).

    ``sampler`` may be ``"scheduler"``: the model's own scheduler, as diffusers' pipeline samples; passing
    these values back explicitly samples the same way."""

    def __init__(self, values: dict, sources: dict):
        super().__init__(values)
        self.sources = {key: sources.get(key, "the model") for key in values}

    def describe(self, given: dict | None = None, shown: dict | None = None) -> str:
        """``sampler pndm (from the folder's PNDMScheduler); 50 steps, guidance 7.5 (from the folder's
        StableDiffusionPipeline)``: the sampling settings of a call that gave ``given`` (None: left unset),
        ``shown`` replacing values for display (the sampler that reproduced the scheduler)."""
        given = {key: value for key, value in (given or {}).items() if value is not None}
        shown = shown or {}
        values = {key: shown.get(key, given.get(key, self.get(key))) for key in ("sampler", "steps", "guidance")}
        sources = {key: CALL_SOURCE if key in given else self.sources.get(key, "the model") for key in values}
        return summary(values, sources)


def summary(values: dict, sources: dict) -> str:
    """Sampling settings with their sources, consecutive ones of the same source grouped."""
    words = {"sampler": lambda v: f"sampler {v}", "steps": lambda v: f"{v} steps",
             "guidance": lambda v: f"guidance {v:g}" if isinstance(v, int | float) else f"guidance {v}"}  # fmt: skip
    groups: list[tuple[str, list[str]]] = []
    for key, value in values.items():
        text = words.get(key, lambda v, k=key: f"{k} {v}")(value)
        source = sources.get(key, "the model")
        if groups and groups[-1][0] == source:
            groups[-1][1].append(text)
        else:
            groups.append((source, [text]))
    return "; ".join(f"{', '.join(texts)} (from {source})" for source, texts in groups)


def resolve(defaults: dict, **given) -> dict:
    """``given`` (keys of SAMPLING_KEYS) with every None replaced by the model's default."""
    unknown = sorted(set(given) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {unknown}; known: {', '.join(SAMPLING_KEYS)}")
    return {key: defaults[key] if value is None else value for key, value in given.items()}


def read_file(folder: str | Path) -> dict:
    """A folder's ``diffrt.json`` ({} when it has none), checked: a JSON object whose sampling keys have
    the right types. Errors name the file."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    values = read_json_object(path, "a JSON object of sampling defaults")
    checks = {"steps": (int, "an integer >= 1"), "sampler": (str, f"a sampler name (or {SCHEDULER!r})"),
              "guidance": ((int, float), "a number >= 0")}  # fmt: skip
    for key, (kind, what) in checks.items():
        value = values.get(key)
        bad_number = isinstance(value, bool) or (key == "steps" and isinstance(value, int) and value < 1) or (
            key == "guidance" and isinstance(value, int | float) and value < 0)  # fmt: skip
        if key in values and (not isinstance(value, kind) or bad_number):
            raise ValueError(f"{path}: {key!r} must be {what}, got {value!r}")
    return values
