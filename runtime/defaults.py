"""Sampling defaults: the one table the pipeline, the command line and every benchmark read.

A model's own defaults (a folder's or an embedded model's ``diffrt.json``, a preset's) override the
built-in ones key by key; ``resolve`` turns what a caller left unset (None) into the model's values.
Light on purpose: the command line imports it to print its help without importing torch.
"""

from __future__ import annotations

from pathlib import Path

from .files import read_json_object

DEFAULT_MODEL = "fashion"  # what `diffrt generate` and `diffrt bench fid` use when no model is named
# diffrt.embedded's, named here for the CLI help
EMBEDDED_MODELS = ("fashion", "fashion-flow", "fashion-lcm", "fashion-dit")
BACKENDS = ("torch", "triton", "compile", "onnxruntime", "tensorrt")  # diffrt.backends', likewise
SAMPLING_KEYS = ("steps", "sampler", "guidance")
BUILTIN = {"steps": 20, "sampler": "dpmpp_2m", "guidance": 7.5}
DEFAULTS_FILE = "diffrt.json"  # optional per-folder defaults: steps, sampler, guidance (and more keys kept)


def merged(model_defaults: dict | None = None) -> dict:
    """The built-in defaults with a model's own on top."""
    return {**BUILTIN, **(model_defaults or {})}


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
    checks = {"steps": (int, "an integer >= 1"), "sampler": (str, "a sampler name"),
              "guidance": ((int, float), "a number >= 0")}  # fmt: skip
    for key, (kind, what) in checks.items():
        value = values.get(key)
        bad_number = isinstance(value, bool) or (key == "steps" and isinstance(value, int) and value < 1) or (
            key == "guidance" and isinstance(value, int | float) and value < 0)  # fmt: skip
        if key in values and (not isinstance(value, kind) or bad_number):
            raise ValueError(f"{path}: {key!r} must be {what}, got {value!r}")
    return values
