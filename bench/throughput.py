"""``diffrt bench throughput``: images/s against batch size, doubling the batch until it no longer fits.

The knee is the smallest batch that reaches 90% of the best throughput: larger batches buy little more
and cost latency and memory.
"""

from __future__ import annotations

import argparse

from .harness import add_call_arguments, fill_call_defaults, percentiles, write_result

KNEE_FRACTION = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset name or a local diffusers folder")
    parser.add_argument("--backend", default="torch")
    add_call_arguments(parser)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=256, help="stop doubling here (or at out-of-memory)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="throughput.json", help="JSON result file")
    parser.set_defaults(run=run)


def _is_out_of_memory(err: BaseException) -> bool:
    return "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError"


def knee(rows: list[dict]) -> int | None:
    """Smallest batch reaching KNEE_FRACTION of the best images/s."""
    if not rows:
        return None
    best = max(r["images_per_s"] for r in rows)
    return min(r["batch"] for r in rows if r["images_per_s"] >= KNEE_FRACTION * best)


def measure(args) -> tuple[dict, dict]:
    import diffrt

    if args.max_batch < 1 or args.repeat < 1:
        raise ValueError(f"--max-batch and --repeat must be >= 1, got {args.max_batch} and {args.repeat}")
    pipe = diffrt.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    fill_call_defaults(args, pipe)
    kw = dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance, output_type="pt")
    kw.update({k: getattr(args, k) for k in ("height", "width") if getattr(args, k)})
    rows, stopped = [], f"reached --max-batch {args.max_batch}"
    batch = 1
    while batch <= args.max_batch:
        try:
            pipe("a red sneaker", num_images=batch, seed=0, **kw)  # warm-up at this shape
            totals = []
            for r in range(args.repeat):
                totals.append(pipe.generate("a red sneaker", num_images=batch, seed=r, **kw).stages.total_ms)
        except (RuntimeError, MemoryError) as err:
            if not _is_out_of_memory(err):
                raise
            stopped = f"out of memory at batch {batch}"
            break
        stats = percentiles(totals)
        rows.append({"batch": batch, "total_ms_p50": stats["p50"], "total_ms_min": stats["min"],
                     "images_per_s": batch * 1000.0 / stats["p50"]})  # fmt: skip
        batch *= 2
    settings = {k: getattr(args, k) for k in ("model", "backend", "sampler", "steps", "guidance", "height", "width",
                                              "max_batch", "repeat", "device", "dtype")}  # fmt: skip
    settings["statistic"] = "images/s from the p50 of whole-call times"
    return settings, {"rows": rows, "knee_batch": knee(rows), "stopped": stopped}


def format_table(metrics: dict) -> str:
    lines = [f"{'batch':>6s} {'total p50 ms':>13s} {'images/s':>10s}"]
    for r in metrics["rows"]:
        mark = "  <- knee" if r["batch"] == metrics["knee_batch"] else ""
        lines.append(f"{r['batch']:6d} {r['total_ms_p50']:13.1f} {r['images_per_s']:10.2f}{mark}")
    lines.append(f"({metrics['stopped']}; knee: smallest batch within {KNEE_FRACTION:.0%} of the best)")
    return "\n".join(lines)


def run(args) -> int:
    settings, metrics = measure(args)
    print(format_table(metrics))
    path = write_result(args.out, "throughput", settings, metrics)
    print(f"wrote {path}")
    return 0
