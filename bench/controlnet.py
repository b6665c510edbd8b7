"""``diffrt bench controlnet``: does a ControlNet make images follow their control, and keep to the prompt?

For ``--samples`` held-out Fashion-MNIST test images (an equal share per class), the Canny edge map of each image
is the control (:mod:`diffrt.models.fashion.edges`) and its class's prompt the text. Each image is generated twice from
the same seed: by the model with the ControlNet and by the model alone. Scores per arm:

- edge agreement: the generated image's Canny edges against the control's, at each of the ``--tolerance``
  distances in pixels (a generated edge pixel counts as right when a control edge lies within it, and the other
  way round): precision, recall and F1 per image, averaged. At Fashion-MNIST's 32x32 one pixel is 3% of the
  width (16 px of a 512 px image), and the classes' silhouettes are alike, so at tolerance 1 the prompt alone
  already scores about 0.7: exact pixels (tolerance 0) tell more;
- adherence: the share the fashion classifier puts in the prompt's class (:mod:`diffrt.bench.quality`).
"""

from __future__ import annotations

import argparse
import time

from .harness import add_call_arguments, fill_call_defaults, write_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="fashion", help="an embedded model (the Fashion-MNIST domain)")
    parser.add_argument("--controlnet", default="fashion-controlnet", help="ControlNet folder or embedded name")
    add_call_arguments(parser)
    parser.add_argument("--scale", default="1", help="comma list of controlnet_scale values (one arm each)")
    parser.add_argument("--samples", type=int, default=1000, help="test images, a multiple of 10 (one share per class)")
    parser.add_argument("--tolerance", default="0,1", help="comma list of the pixels an edge may be off and still "
                        "count (default 0,1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="controlnet.json", help="JSON result file")
    parser.set_defaults(run=run)


def edge_scores(generated, reference, tolerance: int = 1) -> dict:
    """Per image: precision, recall and F1 of bool edge maps ``generated`` against ``reference`` [N, H, W], an
    edge pixel matching when the other map has one within ``tolerance`` pixels (Chebyshev distance). An image
    without edges in a map scores 0 for what that map's pixels decide."""
    import torch

    size = 2 * tolerance + 1

    def near(edges):
        return torch.nn.functional.max_pool2d(edges.float()[:, None], size, stride=1, padding=tolerance)[:, 0] > 0

    def share(hits, total):
        return torch.where(total > 0, hits / total.clamp(min=1), torch.zeros_like(hits))

    generated, reference = generated.bool(), reference.bool()
    precision = share((generated & near(reference)).flatten(1).sum(1).float(), generated.flatten(1).sum(1).float())
    recall = share((reference & near(generated)).flatten(1).sum(1).float(), reference.flatten(1).sum(1).float())
    f1 = share(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def held_out(samples: int):
    """The first ``samples / 10`` test images of each class (uint8 [N, 32, 32]) and their labels."""
    import torch

    from ..train import data

    split = data.load_split("test")
    per_class = samples // 10
    chosen = torch.cat([torch.nonzero(split.labels == k)[:per_class, 0] for k in range(10)])
    return split.images[chosen], split.labels[chosen]


def _generate(pipe, prompts, seeds, batch_size, call, controls=None):
    import torch

    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        extra = {} if controls is None else {"control_image": controls[chunk]}
        out.append(pipe(prompts[chunk], seed=seeds[chunk], output_type="pt", progress=False, **call, **extra).float())
    return torch.cat(out)


def measure(args) -> dict:
    """``{"arms": {"without": scores, "with scale S": scores, ...}, "edge_f1_ratio": {arm: {tolN: ratio}}}``."""
    import diffrt

    from ..models.fashion import captions
    from ..models.fashion.edges import control_pictures, edge_maps, grey_uint8
    from .quality import adherence

    images, labels = held_out(args.samples)
    reference = edge_maps(images)
    controls = control_pictures(reference)
    prompts = [captions.class_prompt(int(k)) for k in labels]
    seeds = [args.seed + k for k in range(len(prompts))]
    base = diffrt.load(args.model, device=args.device)
    controlled = diffrt.load(args.model, device=args.device, controlnet=args.controlnet)
    fill_call_defaults(args, base)
    call = dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance)
    runs = [("without", base, None, call)]
    runs += [(f"with scale {scale:g}", controlled, controls, {**call, "controlnet_scale": scale})
             for scale in args.scale]  # fmt: skip
    arms = {}
    for arm, pipe, arm_controls, options in runs:
        start = time.perf_counter()
        generated = _generate(pipe, prompts, seeds, args.batch_size, options, arm_controls)
        seconds = time.perf_counter() - start
        edges = edge_maps(grey_uint8(generated))
        arms[arm] = {f"edge_tol{t}": {k: float(v.mean()) for k, v in edge_scores(edges, reference, t).items()}
                     for t in args.tolerance}  # fmt: skip
        arms[arm].update(adherence=adherence(generated, labels.tolist()), edge_share=float(edges.float().mean()),
                         generate_s=seconds)  # fmt: skip
    ratios = {arm: {f"tol{t}": m[f"edge_tol{t}"]["f1"] / max(arms["without"][f"edge_tol{t}"]["f1"], 1e-12)
                    for t in args.tolerance} for arm, m in arms.items() if arm != "without"}  # fmt: skip
    return {"arms": arms, "edge_f1_ratio": ratios, "control_edge_share": float(reference.float().mean())}


def run(args) -> int:
    if args.samples < 10 or args.samples % 10:
        raise ValueError(f"--samples must be a positive multiple of 10 (one share per class), got {args.samples}")
    args.tolerance = _numbers(args.tolerance, "--tolerance", int)
    args.scale = _numbers(args.scale, "--scale", float)
    metrics = measure(args)
    settings = {k: getattr(args, k) for k in ("model", "controlnet", "steps", "sampler", "guidance", "scale", "samples",
                                              "tolerance", "seed", "device")}  # fmt: skip
    path = write_result(args.out, "controlnet", settings, metrics)
    print(table(metrics, args.tolerance))
    print(f"wrote {path}")
    return 0


def _numbers(text, option: str, kind) -> list:
    """A comma list of numbers >= 0."""
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise ValueError(f"{option} must be a comma list of numbers >= 0, got {text!r}")
    return values


def table(metrics: dict, tolerances: list[int]) -> str:
    header = " | ".join(f"edge F1 / P / R (tol {t} px)" for t in tolerances)
    rows = [f"| arm | {header} | adherence |", "|---" * (len(tolerances) + 2) + "|"]
    for arm, m in metrics["arms"].items():
        cells = " | ".join("{f1:.3f} / {precision:.3f} / {recall:.3f}".format(**m[f"edge_tol{t}"]) for t in tolerances)
        rows.append(f"| {arm} | {cells} | {m['adherence']:.3f} |")
    for arm, ratios in metrics["edge_f1_ratio"].items():
        shown = ", ".join(f"{ratios[f'tol{t}']:.2f}x at tolerance {t}" for t in tolerances)
        rows.append(f"edge F1 {arm} / without: {shown}")
    return "\n".join(rows)
