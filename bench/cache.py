"""``diffrt bench cache``: what a step cache costs in quality against what simply taking fewer steps costs.

Cells: the uncached reference (``--steps``), each ``--cache`` setting at those steps, and each of the
``--fewer-steps`` counts uncached. For every cell: model calls (full and cached, and the full-equivalent
calls: the reference's calls scaled by the measured denoising time), time per image and denoising time per
image on this machine (medians of ``--repeats`` rounds that visit every cell in turn, so the cells share the
machine's state), and prompt adherence and domain FID/KID on ``--samples`` seeded images (the same seeds in
every cell; :mod:`diffrt.bench.quality`). A cell is on the Pareto front when no other cell is both faster and
of lower FID. The verdict says, for each cache setting, whether a fewer-steps cell at most as slow beats it.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ..core.defaults import DEFAULT_MODEL
from .harness import add_call_arguments, environment, fill_call_defaults, write_result

KIND = "cache"
DEFAULT_CACHES = {"unet": ("deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=4",
                           "deepcache:interval=5", "deepcache:interval=3,depth=2"),
                  "transformer": ("fbcache:threshold=0.1", "fbcache:threshold=0.2", "fbcache:threshold=0.3",
                                  "fbcache:interval=2", "fbcache:interval=3")}  # fmt: skip
FEWER_SHARES = (0.7, 0.5, 0.35)  # default --fewer-steps: these shares of --steps
TIMING_PROMPTS = ("a t-shirt", "a pair of trousers", "a dress", "a sneaker", "a bag")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model or folder (default {DEFAULT_MODEL})")
    add_call_arguments(parser)
    parser.add_argument("--cache", action="append", default=None, metavar="SPEC",
                        help="a cache setting such as deepcache:interval=3 (repeatable; default: a sweep that "
                             "suits the model)")  # fmt: skip
    parser.add_argument("--fewer-steps", default=None, help="comma list of uncached step counts to compare with "
                        "(default: 70%%, 50%% and 35%% of --steps)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=1000, help="images per cell for the quality scores, a "
                        "multiple of 10 (default 1000; 0 skips the scores)")  # fmt: skip
    parser.add_argument("--timing-images", type=int, default=10, help="images per timed call (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds over all cells (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch", help="torch, compile or triton (default torch)")
    parser.add_argument("--out", default="cache.json", help="JSON result file (default ./cache.json)")
    parser.add_argument("--plot", default=None, help="PNG plot (default: next to --out, same name)")
    parser.set_defaults(run=run)


def _check_arguments(args) -> None:
    if args.samples < 0 or args.samples % 10:
        raise ValueError(f"--samples must be 0 or a positive multiple of 10 (one share per class), got {args.samples}")
    for name in ("timing_images", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def fewer_steps(text: str | None, steps: int) -> list[int]:
    """The uncached step counts to compare with: ``text`` (a comma list, each below ``steps``) or the defaults."""
    if text is None:
        return sorted({max(1, round(steps * share)) for share in FEWER_SHARES} - {steps}, reverse=True)
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--fewer-steps must be a comma list of integers, got {text!r}") from None
    bad = [n for n in counts if not 1 <= n < steps]
    if bad or not counts:
        raise ValueError(f"--fewer-steps must be step counts from 1 to {steps - 1} (below --steps), got {text!r}")
    return counts


def cells(args, pipe) -> list[dict]:
    """The reference, the cache settings (parsed and checked against the model now) and the fewer-steps runs."""
    from ..core.step_cache import parse

    kind = "transformer" if pipe.model.denoiser_part == "transformer" else "unet"
    specs = args.cache or DEFAULT_CACHES[kind]
    found = [{"label": f"{args.steps} steps", "family": "reference", "steps": args.steps, "cache": None}]
    for spec in specs:
        config = parse(spec)
        pipe.model.check_cache(config)
        found.append({"label": str(config), "family": "cache", "steps": args.steps, "cache": config})
    for n in fewer_steps(args.fewer_steps, args.steps):
        found.append({"label": f"{n} steps", "family": "fewer steps", "steps": n, "cache": None})
    return found


def _call(pipe, args, cell, prompts, seeds):
    return pipe.generate(list(prompts), seed=list(seeds), steps=cell["steps"], sampler=args.sampler,
                         guidance=args.guidance, cache=cell["cache"], output_type="pt", progress=False)  # fmt: skip


def time_cells(pipe, args, found: list[dict]) -> None:
    """Median ms per image (whole call, and denoising) over ``repeats`` rounds visiting every cell in turn,
    after one warm-up call each; the step cache's call tally of the last round."""
    prompts = [TIMING_PROMPTS[i % len(TIMING_PROMPTS)] for i in range(args.timing_images)]
    seeds = [args.seed + i for i in range(args.timing_images)]
    for cell in found:
        _call(pipe, args, cell, prompts, seeds)
        cell["_total"], cell["_denoise"] = [], []
    for _ in range(args.repeats):
        for cell in found:
            result = _call(pipe, args, cell, prompts, seeds)
            cell["_total"].append(result.stages.total_ms / len(prompts))
            cell["_denoise"].append(result.stages.denoise_ms / len(prompts))
            calls = len(result.stages.unet_calls_ms)
            full = result.stages.full_calls if result.stages.full_calls is not None else calls
            cell["full_calls"], cell["cached_calls"] = full, calls - full
    for cell in found:
        cell["ms_per_image"] = statistics.median(cell.pop("_total"))
        cell["denoise_ms_per_image"] = statistics.median(cell.pop("_denoise"))


def score_cells(pipe, args, found: list[dict]) -> None:
    from ..models.fashion import classifier as fashion_classifier
    from . import quality

    classifier = fashion_classifier.load_classifier()
    reference = fashion_classifier.load_reference(classifier=classifier)
    for cell in found:
        start = time.perf_counter()
        scores = quality.evaluate_pipeline(
            pipe, per_class=args.samples // fashion_classifier.NUM_CLASSES, seed=args.seed, batch_size=100,
            classifier=classifier,
            reference=reference, steps=cell["steps"], sampler=args.sampler, guidance=args.guidance,
            cache=cell["cache"],
        )  # fmt: skip
        cell.update({key: scores[key] for key in ("adherence", "fid", "kid_mean", "kid_std")})
        print(f"  {cell['label']:32s} adherence {scores['adherence']:.3f}  FID {scores['fid']:.3f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


def summarize(found: list[dict]) -> None:
    """Speedups against the reference, full-equivalent calls and the Pareto front on (time, FID)."""
    ref = found[0]
    for cell in found:
        cell["denoise_speedup"] = ref["denoise_ms_per_image"] / cell["denoise_ms_per_image"]
        cell["speedup"] = ref["ms_per_image"] / cell["ms_per_image"]
        cell["full_equivalent_calls"] = ref["full_calls"] / cell["denoise_speedup"]
    scored = [c for c in found if "fid" in c]
    for cell in scored:
        cell["pareto"] = not any(o is not cell and o["ms_per_image"] <= cell["ms_per_image"] and o["fid"] < cell["fid"]
                                 for o in scored)  # fmt: skip


def verdicts(found: list[dict]) -> dict[str, str]:
    """Per cache setting: the fewer-steps cells at most as slow with FID as low and adherence as high (it is
    beaten), else the fewer-steps cell nearest in time, with its time ratio and scores beside the cache's."""
    rivals = [c for c in found if c["family"] == "fewer steps" and "fid" in c]
    said = {}
    for cell in (c for c in found if c["family"] == "cache" and "fid" in c and rivals):
        better = [o["label"] for o in rivals if o["ms_per_image"] <= cell["ms_per_image"]
                  and o["fid"] <= cell["fid"] and o["adherence"] >= cell["adherence"]]  # fmt: skip
        if better:
            said[cell["label"]] = "beaten by " + ", ".join(better) + " (as fast or faster, FID and adherence as good)"
            continue
        near = min(rivals, key=lambda o: abs(o["ms_per_image"] - cell["ms_per_image"]))
        ratio = near["ms_per_image"] / cell["ms_per_image"]
        said[cell["label"]] = (f"not beaten (no fewer-steps cell at most as slow is as good); the nearest in time, "
                               f"{near['label']}, takes {ratio:.2f}x its time with FID "
                               f"{near['fid']:.3f} (cache {cell['fid']:.3f}) and adherence {near['adherence']:.3f} "
                               f"(cache {cell['adherence']:.3f})")  # fmt: skip
    return said


def table(found: list[dict]) -> str:
    header = (f"{'cell':32s} {'full':>5s} {'cached':>6s} {'eq.calls':>8s} {'ms/img':>8s} {'denoise':>8s} "
              f"{'speedup':>8s} {'adh':>6s} {'FID':>7s}  pareto")  # fmt: skip
    lines = [header]
    for c in found:
        quality = (f"{c['adherence']:6.3f} {c['fid']:7.3f}  {'yes' if c['pareto'] else ''}" if "fid" in c
                   else f"{'-':>6s} {'-':>7s}")  # fmt: skip
        lines.append(f"{c['label']:32s} {c['full_calls']:5d} {c['cached_calls']:6d} {c['full_equivalent_calls']:8.1f} "
                     f"{c['ms_per_image']:8.1f} {c['denoise_ms_per_image']:8.1f} {c['denoise_speedup']:7.2f}x "
                     f"{quality}")  # fmt: skip
    return "\n".join(lines)


def plot(found: list[dict], title: str, path) -> None:
    """FID and adherence against ms per image: the cache settings and the fewer-steps runs as two series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, what in ((axes[0], "fid", "domain FID (lower is better)"), (axes[1], "adherence", "adherence")):
        for family, style in (("fewer steps", "o-"), ("cache", "s"), ("reference", "k*")):
            points = sorted((c["ms_per_image"], c[key], c["label"]) for c in found if c["family"] == family)
            if not points:
                continue
            xs, ys, labels = zip(*points, strict=True)
            ax.plot(xs, ys, style, label=family, markersize=8 if family == "reference" else 6)
            for x, y, label in points:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("ms per image (this machine)")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    from ..api import load

    _check_arguments(args)
    pipe = load(args.model, device=args.device, backend=args.backend)
    fill_call_defaults(args, pipe)
    found = cells(args, pipe)
    print(f"timing {len(found)} cells: {args.repeats} rounds of {args.timing_images} images", flush=True)
    time_cells(pipe, args, found)
    if args.samples:
        print(f"scoring {len(found)} cells on {args.samples} images each", flush=True)
        score_cells(pipe, args, found)
    summarize(found)
    said = verdicts(found)
    print(f"\n{args.model}, {args.sampler}, guidance {args.guidance}, backend {args.backend} ({environment()['cpu']}):")
    print(table(found))
    for label, verdict in said.items():
        print(f"  {label}: {verdict}")
    settings = {
        "model": args.model, "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance,
        "backend": args.backend, "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
        "samples": args.samples, "timing_images": args.timing_images, "repeats": args.repeats, "seed": args.seed,
        "metrics": "ms per image: median over the rounds of a call's wall time / images; denoise_speedup: the "
                   "reference's denoising time over the cell's; full_equivalent_calls: the reference's calls over "
                   "denoise_speedup; adherence, fid, kid: diffrt.bench.quality on the seeded images",
    }  # fmt: skip
    rows = [{**{k: v for k, v in c.items() if k != "cache"}, "cache": None if c["cache"] is None else str(c["cache"])}
            for c in found]  # fmt: skip
    path = write_result(args.out, KIND, settings, {"cells": rows, "verdicts": said})
    if args.samples:
        picture = args.plot or str(path.with_suffix(".png"))
        plot(found, f"{args.model}: step cache against fewer steps ({args.sampler}, {args.steps} steps)", picture)
        print(f"wrote {path} and {picture}")
    else:
        print(f"wrote {path}")
    return 0
