"""The HTTP API of ``diffrt serve``, without Ray: a request body read into a :class:`Job`, jobs that can share
one pipeline call grouped, and a batch's images split back into answers.

The body is OpenAI's ``POST /v1/images/generations`` (``prompt``, ``n``, ``size`` "WxH", ``response_format``
"b64_json"; ``model`` and ``user`` are accepted) plus diffrt's fields (``seed``, ``steps``, ``sampler``,
``guidance``, ``negative_prompt``, ``lora``). This module checks the body's shape only: the JSON types, the size's
format, unknown fields. Whether the values make sense is the pipeline's own check (``Pipeline.check``), run on the
replica before a job is queued, so the server and the library refuse the same calls with the same words.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass

from ..core.checks import integer, number

OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "user")
DIFFRT_FIELDS = ("seed", "steps", "sampler", "guidance", "negative_prompt", "lora")
RESPONSE_FORMATS = ("b64_json",)  # "url" would need storage the server does not have
MAX_IMAGES = 8  # per request by default, as OpenAI's n (at most 10 there); many more images are `diffrt batch`'s job
SEED_DRAW = 2**63  # a request without a seed gets one below this, so seed + n stays a valid seed
SIZE_FORMAT = re.compile(r"(\d{1,5})x(\d{1,5})")
JSON_TYPES = {  # the fields whose JSON type is checked here: (Python types, the words for it)
    "prompt": (str, "a string"), "negative_prompt": (str, "a string"), "sampler": (str, "a string"),
    "n": (int, "an integer"), "seed": (int, "an integer"), "steps": (int, "an integer"),
    "width": (int, "an integer"), "height": (int, "an integer"), "guidance": (int | float, "a number"),
}  # fmt: skip


class BadRequest(ValueError):
    """A body that cannot be a request: ``field`` names the culprit (OpenAI's ``param``)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Job:
    """One request's images: what the pipeline is called with, in a form that can be compared and hashed."""

    prompt: str
    n: int
    seed: int  # image k gets seed + k, as in the library
    negative_prompt: str | None
    options: tuple  # sorted (name, value) pairs of pipeline options: steps, sampler, guidance, height, width
    lora: tuple = ()  # sorted (name, scale) pairs: the LoRA scales this request sets ((): the server's own)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.n)]

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call: same options, LoRA scales and negative-prompt use."""
        return self.options, self.lora, self.negative_prompt is None

    def call(self) -> dict:
        """The pipeline arguments of this job alone (``pipe.generate(**job.call())``)."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, num_images=self.n, seed=self.seed,
                    **dict(self.options))  # fmt: skip

    def settings(self) -> dict:
        """What the answer reports as this job's settings."""
        return {**dict(self.options), "negative_prompt": self.negative_prompt, "lora": dict(self.lora) or None}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a replica, refused up front (400) so no request holds it for long; each can be
    raised with ``diffrt serve``'s options. ``max_work``: images x steps x megapixels (8 images of 1024x1024 at
    50 steps are 419)."""

    max_prompt_chars: int = 4000
    max_steps: int = 150
    max_images: int = MAX_IMAGES
    max_work: float = 500.0

    def check_settings(self) -> None:
        for name in ("max_prompt_chars", "max_steps", "max_images"):
            integer(name, getattr(self, name), 1)
        number("max_work", self.max_work, 0, low_open=True)

    def check(self, job: Job, defaults: dict) -> None:
        """``job`` against the limits, with the model's ``defaults`` (steps, width, height) for what it leaves out;
        a ValueError names the field, the value and the limit."""
        options = {**defaults, **dict(job.options)}
        for field, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt or "")):
            if len(text) > self.max_prompt_chars:
                raise ValueError(f"{field} has {len(text)} characters; this server takes at most "
                                 f"{self.max_prompt_chars}")  # fmt: skip
        if job.n > self.max_images:
            raise ValueError(f"n must be at most {self.max_images} on this server, got {job.n}")
        steps = options.get("steps")
        if isinstance(steps, int) and steps > self.max_steps:
            raise ValueError(f"steps must be at most {self.max_steps} on this server, got {steps}")
        sizes = (options.get("width"), options.get("height"))
        if isinstance(steps, int) and all(isinstance(v, int) for v in sizes):
            work = job.n * steps * sizes[0] * sizes[1] / 1e6
            if work > self.max_work:
                raise ValueError(f"n x steps x megapixels is {work:.0f} ({job.n} x {steps} x {sizes[0]}x{sizes[1]}); "
                                 f"this server takes at most {self.max_work:g} per request")  # fmt: skip


def parse(body, model: str) -> Job:
    """A request body (parsed JSON) as a :class:`Job` for the served ``model``, or :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest(None, f"the body must be a JSON object, got {type(body).__name__}")
    check_record(body, (*OPENAI_FIELDS, *DIFFRT_FIELDS))
    if body.get("prompt") is None:
        raise BadRequest("prompt", "prompt is required")
    if body.get("model") not in (None, model):
        raise BadRequest("model", f"this server runs model {model!r}, not {body['model']!r}")
    response_format = body.get("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise BadRequest("response_format", f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, "
                                            f"got {response_format!r}")  # fmt: skip
    n = 1 if body.get("n") is None else body["n"]
    if n < 1:  # the upper bound is the server's (Limits.max_images)
        raise BadRequest("n", f"n must be an integer >= 1, got {n}")
    options = {name: body[name] for name in ("steps", "guidance", "sampler") if body.get(name) is not None}
    if body.get("size") is not None:
        options["width"], options["height"] = _size(body["size"])
    seed = body.get("seed")
    return Job(body["prompt"], n, secrets.randbelow(SEED_DRAW) if seed is None else seed,
               body.get("negative_prompt"), tuple(sorted(options.items())), _lora(body.get("lora")))  # fmt: skip


def check_record(record: dict, allowed) -> None:
    """A request body's or a batch row's fields: each one of ``allowed`` and of its JSON type (:data:`JSON_TYPES`;
    booleans are not numbers, floats must be finite, null counts as absent), else :class:`BadRequest`."""
    for name, value in record.items():
        if name not in allowed:
            raise BadRequest(name, f"unknown field {name!r}; allowed: {', '.join(allowed)}")
        kind, what = JSON_TYPES.get(name, (object, ""))
        finite = not isinstance(value, float) or math.isfinite(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or not finite):
            raise BadRequest(name, f"{name} must be {what}, got {value!r}")


def field_named(message: str) -> str | None:
    """The request field a library error is about: its messages start with the argument's name ("steps must
    be ...", "height must be ..."), which the API calls by its own name (height and width are ``size``)."""
    first = message.split(" ", 1)[0].rstrip(":")
    first = {"height": "size", "width": "size", "num_images": "n", "seeds": "seed"}.get(first, first)
    return first if first in (*OPENAI_FIELDS, *DIFFRT_FIELDS) else None


def _size(size) -> tuple[int, int]:
    match = SIZE_FORMAT.fullmatch(size) if isinstance(size, str) else None
    if match is None:
        raise BadRequest("size", f"size must be \"WIDTHxHEIGHT\" in pixels, such as \"32x32\", got {size!r}")
    return int(match[1]), int(match[2])


def _lora(value) -> tuple:
    """``{"name": scale}`` as sorted pairs; which names exist is the replica's check (it loaded them)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise BadRequest("lora", f"lora must be an object of LoRA names and scales, such as {{\"style\": 0.8}}, "
                                 f"got {value!r}")  # fmt: skip
    scales = []
    for name, scale in value.items():
        try:
            scales.append((name, number(f"lora[{name!r}] (its scale)", scale)))
        except ValueError as err:
            raise BadRequest("lora", str(err)) from None
    return tuple(sorted(scales))


def group(jobs: list[Job], max_images: int) -> list[list[int]]:
    """Indices of ``jobs`` in runs that share one pipeline call: equal keys, at most ``max_images`` images each
    (a job of more images than that runs alone), in arrival order within a run."""
    runs: list[list[int]] = []
    open_runs: dict[tuple, tuple[list[int], int]] = {}  # key -> (the run being filled, its images)
    for index, job in enumerate(jobs):
        run, images = open_runs.get(job.key, (None, 0))
        if run is None or images + job.n > max_images:
            run, images = [], 0
            runs.append(run)
        run.append(index)
        open_runs[job.key] = (run, images + job.n)
    return runs


def merged_call(jobs: list[Job]) -> dict:
    """One pipeline call for jobs with equal keys: their prompts, negative prompts and seeds one after another."""
    first = jobs[0]
    prompts = [job.prompt for job in jobs for _ in range(job.n)]
    negatives = None if first.negative_prompt is None else [job.negative_prompt for job in jobs for _ in range(job.n)]
    seeds = [seed for job in jobs for seed in job.seeds]
    return dict(prompt=prompts, negative_prompt=negatives, seed=seeds, **dict(first.options))
