"""``diffrt bench fid``: a quality regression gate on domain FID/KID and prompt adherence.

A run generates ``--samples`` images (an equal share per class prompt, seeded), scores them with the project's
Fashion-MNIST classifier (:mod:`diffrt.bench.quality`) and compares the scores with a stored baseline: a
result file of this same command and settings, made with ``--update-baseline``. The verdict is a regression
when FID rises by more than ``--tolerance`` (relative) or adherence falls by more than ``--adherence-drop``
(absolute); the command then exits with status 1. The run is deterministic for a given machine and version,
and the tolerance absorbs the small float differences between CPUs.

A baseline that was measured on another model (other weights), sampler, step count, sample count, seed,
guidance or size is refused with the differing settings named: comparing them would say nothing.

With ``--controlnet`` (a Fashion-MNIST ControlNet such as ``fashion-controlnet``) image k of a class is generated
with the Canny edges of that class's k-th test image as its control (:mod:`diffrt.bench.controlnet`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.defaults import DEFAULT_MODEL, SCHEDULER
from ..core.fingerprint import weights_digest
from ..core.results import read_result, require_numbers
from .harness import add_call_arguments, fill_call_defaults, write_result

KIND = "fid"
COMPARED = ("model", "weights", "sampler", "steps", "samples", "seed", "guidance", "height", "width", "prompts",
            "cache", "controlnet")  # fmt: skip
DEFAULT_TOLERANCE = 0.15  # relative FID rise allowed
DEFAULT_ADHERENCE_DROP = 0.05  # absolute adherence drop allowed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or a local diffusers folder "
                        f"(default: the default model, {DEFAULT_MODEL})")
    add_call_arguments(parser)
    parser.add_argument("--cache", default=None, help="a step cache to gate (diffrt.core.step_cache), such as "
                        "deepcache:interval=3; default none")  # fmt: skip
    parser.add_argument("--controlnet", default=None, help="a ControlNet to gate with (fashion-controlnet): each image "
                        "takes the edges of a test image of its class as control")  # fmt: skip
    parser.add_argument("--samples", type=int, default=200, help="images, a multiple of 10 (one share per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", default="canonical", choices=("canonical", "held_out"))
    parser.add_argument("--baseline", required=True, help="baseline JSON (written with --update-baseline)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="allowed relative FID rise")
    parser.add_argument("--adherence-drop", type=float, default=DEFAULT_ADHERENCE_DROP,
                        help="allowed absolute drop of adherence")  # fmt: skip
    parser.add_argument("--update-baseline", action="store_true", help="write this run as the new baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="draw the samples through `diffrt batch` (Ray "
                        "Data) with this many workers: 8-bit PNGs, resumable with --samples-dir")  # fmt: skip
    parser.add_argument("--samples-dir", default=None, help="with --workers: the batch's folder (PNGs, manifest); "
                        "a rerun reuses its finished images (default: a temporary folder)")  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON result file of this run")
    parser.set_defaults(run=run)


def weights_fingerprint(components) -> str:
    """The denoiser's and VAE's weights fingerprint (:mod:`diffrt.core.fingerprint`): the baseline is tied to them."""
    return weights_digest({components.denoiser_name: components.denoiser, "vae": components.vae})[:16]


def measure(pipe, settings: dict) -> dict:
    """Generate and score ``settings['samples']`` images: adherence, domain FID and KID."""
    from ..models.fashion import classifier as fashion_classifier
    from . import quality

    per_class = settings["samples"] // fashion_classifier.NUM_CLASSES
    if settings.get("workers"):
        scores = quality.score(*_batch_samples(settings, per_class))
        return _metrics(scores, settings)
    controls = _controls(settings["samples"]) if settings.get("controlnet") else None
    scores = quality.evaluate_pipeline(
        pipe, per_class=per_class, prompts=settings["prompts"], seed=settings["seed"], batch_size=100,
        controls=controls, steps=settings["steps"], sampler=settings["sampler"], guidance=settings["guidance"],
        height=settings["height"], width=settings["width"], cache=settings.get("cache"),
    )  # fmt: skip
    return _metrics(scores, settings)


def _metrics(scores: dict, settings: dict) -> dict:
    return {
        "fid": scores["fid"], "kid_mean": scores["kid_mean"], "kid_std": scores["kid_std"],
        "adherence": scores["adherence"], "adherence_per_class": scores["adherence_per_class"],
        "kid_subset_size": min(1000, settings["samples"]),
    }  # fmt: skip


def _batch_samples(settings: dict, per_class: int):
    """The run's images made by ``diffrt batch`` (Ray Data, ``settings['workers']`` workers), read back from their
    PNGs in plan order, with their labels."""
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from ..serve import batch
    from . import quality

    plan = quality.sample_plan(per_class, settings["prompts"], settings["seed"])
    options = {key: settings[key] for key in ("steps", "sampler", "guidance", "width", "height")}
    with tempfile.TemporaryDirectory(prefix="diffrt-fid-") as scratch:
        folder = Path(settings["samples_dir"] or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        prompts = folder / "samples.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": text, "seed": seed, **options}) + "\n"
                                   for _, _, text, seed in plan))  # fmt: skip
        runner = batch.BatchSettings(model=settings["model_source"], device=settings["device"],
                                     workers=settings["workers"], batch_size=100 // settings["workers"] or 1)
        summary = batch.run(prompts, folder, runner)
        if summary["failed"]:
            raise ValueError(batch.describe(summary, folder))
        files = {entry["row"]: folder / entry["file"] for entry in batch.finished(folder).values()}
        pixels = [np.asarray(Image.open(files[row]).convert("RGB")) for row in range(len(plan))]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return images, torch.tensor([label for label, *_ in plan])


def _controls(samples: int) -> dict:
    """Per class, the control pictures of its first test images (their Canny edges)."""
    from ..models.fashion.edges import control_pictures, edge_maps
    from .controlnet import held_out

    images, labels = held_out(samples)
    pictures = control_pictures(edge_maps(images))
    return {int(k): pictures[labels == k] for k in labels.unique()}


def read_baseline(path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"baseline {path} does not exist; make it with --update-baseline")
    record = read_result(path)  # checks JSON and schema
    if record.get("kind") != KIND:
        raise ValueError(f"{path} is a {record.get('kind')!r} result, not a {KIND!r} baseline")
    require_numbers(record["metrics"], ("fid", "adherence", "kid_mean", "kid_std"), f"baseline {path}: 'metrics'")
    return record


def check_comparable(baseline: dict, settings: dict, path) -> None:
    """Refuse a baseline measured under other settings or on other weights, naming what differs."""
    theirs = baseline.get("settings", {})
    differ = [f"{key}: baseline {theirs.get(key)!r}, this run {settings.get(key)!r}"
              for key in COMPARED if theirs.get(key) != settings.get(key)]  # a key missing: None (no cache)
    if differ:
        raise ValueError(f"baseline {path} was measured under other settings, refusing to compare ("
                         + "; ".join(differ) + "); make a new one with --update-baseline")  # fmt: skip


def verdict(baseline_metrics: dict, metrics: dict, tolerance: float, adherence_drop: float) -> tuple[bool, list[str]]:
    """(passed, one line per metric) of this run against the baseline's metrics."""
    fid_limit = baseline_metrics["fid"] * (1 + tolerance)
    adherence_floor = baseline_metrics["adherence"] - adherence_drop
    fid_ok = metrics["fid"] <= fid_limit
    adherence_ok = metrics["adherence"] >= adherence_floor
    lines = [
        f"domain FID {metrics['fid']:.3f} (baseline {baseline_metrics['fid']:.3f}, limit {fid_limit:.3f}): "
        + ("ok" if fid_ok else "REGRESSION"),
        f"adherence {metrics['adherence']:.3f} (baseline {baseline_metrics['adherence']:.3f}, "
        f"floor {adherence_floor:.3f}): " + ("ok" if adherence_ok else "REGRESSION"),
        f"KID {metrics['kid_mean']:.5f} +- {metrics['kid_std']:.5f} (baseline {baseline_metrics['kid_mean']:.5f}; "
        "reported, not gated)",
    ]
    return fid_ok and adherence_ok, lines


def _settings(args, pipe) -> dict:
    fill_call_defaults(args, pipe)
    size = (pipe.default_size, pipe.default_size)
    return {
        "model": args.model if not Path(args.model).exists() else Path(args.model).resolve().name,
        "weights": weights_fingerprint(pipe.components),
        "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
        "samples": args.samples, "seed": args.seed, "prompts": args.prompts, "height": size[0], "width": size[1],
        "dtype": "float32", "device": args.device, "cache": args.cache, "controlnet": args.controlnet,
        "workers": args.workers, "samples_dir": args.samples_dir, "model_source": args.model,
    }  # fmt: skip


def _check_workers(args) -> None:
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    given = [flag for flag, value in (("--cache", args.cache), ("--controlnet", args.controlnet)) if value]
    if given:
        raise ValueError(f"--workers draws plain text-to-image rows through diffrt batch: it does not run with "
                         f"{' or '.join(given)}")  # fmt: skip
    from ..core.optional import require

    require("ray", "pyarrow", feature="bench fid --workers")


def run(args) -> int:
    import diffrt

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.samples < 10 or args.samples % 10:
        raise ValueError(f"--samples must be a positive multiple of 10 (one share per class), got {args.samples}")
    if not (args.tolerance >= 0 and 0 <= args.adherence_drop <= 1):
        raise ValueError(f"need --tolerance >= 0 and 0 <= --adherence-drop <= 1, "
                         f"got {args.tolerance}, {args.adherence_drop}")  # fmt: skip
    if args.sampler not in (None, SCHEDULER):
        from ..samplers import get

        get(args.sampler)  # an unknown name fails here, before the slow part
    if args.cache is not None:
        from ..core.step_cache import parse

        args.cache = str(parse(args.cache))  # one spelling in the baseline; a bad spec fails before the slow part
    if args.workers is not None:
        _check_workers(args)
    baseline = None if args.update_baseline else read_baseline(args.baseline)
    pipe = diffrt.load(args.model, device=args.device, controlnet=args.controlnet)
    settings = _settings(args, pipe)
    if baseline is not None:
        check_comparable(baseline, settings, args.baseline)
    metrics = measure(pipe, settings)
    if args.out:
        write_result(args.out, KIND, settings, metrics)
    if args.update_baseline:
        write_result(args.baseline, KIND, settings, metrics)
        print(f"FID {metrics['fid']:.3f}, adherence {metrics['adherence']:.3f}: wrote the baseline {args.baseline}")
        return 0
    passed, lines = verdict(baseline["metrics"], metrics, args.tolerance, args.adherence_drop)
    cached = f", cache {settings['cache']}" if settings["cache"] else ""
    print(f"{settings['model']} {settings['sampler']} {settings['steps']} steps{cached}, {settings['samples']} images:")
    print("\n".join("  " + line for line in lines))
    print("PASS" if passed else "FAIL: quality regressed beyond tolerance")
    return 0 if passed else 1
