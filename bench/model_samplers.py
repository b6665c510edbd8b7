"""``diffrt bench samplers --model fashion|fashion-flow|fashion-lcm|fashion-dit``: quality against steps.

For each sampler and step count the model generates ``--samples`` images (an equal share per class prompt,
the same seeds for every cell) that the project's classifier scores (:mod:`diffrt.bench.quality`): prompt
adherence and domain FID/KID against the Fashion-MNIST test set. Time per image is the wall time of the
pipeline calls alone (not the scoring), on this machine, measured in the same run for every cell.
"""

from __future__ import annotations

import time

from ..core.results import write_result
from .sampler_configs import nfe_of, select

# samplers that suit each kind of model (the LCM student is a consistency model: only its own sampler)
DEFAULT_SAMPLERS = {"eps": "dpmpp_2m,unipc,ddim,euler", "flow": "euler,heun,dpmpp_2m", "consistency": "lcm"}
DEFAULT_STEPS = "1,2,4,8,20,50"
DEFAULT_SAMPLES = 500


def model_kind(components) -> str:
    if components.is_consistency:
        return "consistency"
    return "flow" if components.is_flow else "eps"


def sweep(pipe, configs: dict, steps: list[int], samples: int, guidance: float, seed: int = 0, progress=True):
    """{label: {"steps", "nfe", "adherence", "fid", "kid_mean", "seconds_per_image"}} for every configuration."""
    from tqdm.auto import tqdm

    from ..models.fashion import classifier as fashion_classifier
    from . import quality

    classifier = fashion_classifier.load_classifier()
    reference = fashion_classifier.load_reference(classifier=classifier)
    curves = {}
    cells = [(label, n) for label in configs for n in steps]
    with tqdm(total=len(cells), desc="samplers", disable=not progress) as bar:
        for label, (name, options) in configs.items():
            curve = {key: [] for key in ("steps", "nfe", "adherence", "fid", "kid_mean", "seconds_per_image")}
            for n in steps:
                start = time.perf_counter()
                scores = quality.evaluate_pipeline(
                    pipe, per_class=samples // fashion_classifier.NUM_CLASSES, seed=seed, classifier=classifier,
                    reference=reference, batch_size=100, steps=n, sampler=name, guidance=guidance, **options,
                )  # fmt: skip
                curve["steps"].append(n)
                curve["nfe"].append(nfe_of(name, options, n))
                for key in ("adherence", "fid", "kid_mean"):
                    curve[key].append(scores[key])
                curve["seconds_per_image"].append(scores.get("generate_s", time.perf_counter() - start) / samples)
                bar.set_postfix(cell=f"{label}@{n}", fid=f"{scores['fid']:.2f}", adh=f"{scores['adherence']:.2f}")
                bar.update()
            curves[label] = curve
    return curves


def table(curves: dict, steps: list[int], key: str, fmt: str) -> str:
    lines = [f"{'sampler':16s}" + "".join(f"{n:>10d}" for n in steps)]
    for label, c in curves.items():
        by_steps = dict(zip(c["steps"], c[key], strict=True))
        lines.append(f"{label:16s}" + "".join(f"{format(by_steps[n], fmt):>10s}" for n in steps))
    return "\n".join(lines)


def run(args, configs: dict, steps: list[int]) -> int:
    from ..api import load

    samples = args.samples if args.samples is not None else DEFAULT_SAMPLES
    if samples < 10 or samples % 10:
        raise ValueError(f"--samples must be a positive multiple of 10 (one share per class), got {samples}")
    pipe = load(args.model, device=args.device)
    kind = model_kind(pipe.components)
    if configs is None:
        configs = select(DEFAULT_SAMPLERS[kind])
    guidance = args.guidance if args.guidance is not None else pipe.defaults["guidance"]
    curves = sweep(pipe, configs, steps, samples, guidance, args.seed, progress=True)
    for key, title, fmt in (("adherence", "prompt adherence", ".3f"), ("fid", "domain FID", ".2f"),
                            ("seconds_per_image", "seconds per image (generation only)", ".4f")):  # fmt: skip
        print(f"\n{title} by steps ({args.model}, {samples} images per cell, guidance {guidance}):")
        print(table(curves, steps, key, fmt))
    settings = {
        "model": args.model, "model_kind": kind, "steps": steps, "samples": samples, "guidance": guidance,
        "seed": args.seed, "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
        "samplers": {label: {"sampler": name, "options": options} for label, (name, options) in configs.items()},
        "metrics": "adherence: share classified as the prompt's class; fid/kid: domain FID/KID on the project "
                   "classifier's penultimate features against the 10k test images",
    }  # fmt: skip
    out = args.out if args.out != "samplers-gmm.json" else f"samplers-{args.model}.json"
    write_result(out, "samplers-model", settings, {"curves": curves})
    print(f"\nwrote {out}")
    return 0
