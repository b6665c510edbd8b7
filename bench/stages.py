"""Per-stage latency, torch eager against ONNX Runtime (CPU EP), side by side in one process.

Each repeat runs every stage on both backends, alternating which goes first, so drift in machine load
hits both alike; the table shows medians. Run: ``python -m diffrt.bench.stages --model tiny --batches 1 8``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

STAGES = ("text_encoder", "unet", "vae_decoder")


def stage_inputs(pipe, stage: str, batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of one stage for ``batch`` images (the U-Net sees 2x: guidance's two halves)."""
    spec = pipe.model.graph_specs()[stage]
    length = pipe.components.tokenizers[0].model_max_length
    n = 2 * batch if stage == "unet" else batch
    values = {"batch": n, "height": height, "width": width, "sequence": length}
    return spec.sample_inputs(values, "fp32", generator=torch.Generator().manual_seed(seed))


def stage_latency(
    model: str = "tiny", batches=(1, 8), repeats: int = 20, warmup: int = 3, size: int | None = None,
    threads: int | None = None, cache_dir=None,
) -> list[dict]:  # fmt: skip
    """Median ms per (stage, batch) for the torch and onnxruntime backends on the CPU, float32."""
    from ..api import load

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)  # the same thread count for both runtimes
    pipes = {
        "torch": load(model, device="cpu", dtype="float32"),
        "onnxruntime": load(
            model, device="cpu", dtype="float32", backend="onnxruntime", cache_dir=cache_dir, threads=threads
        ),  # fmt: skip
    }
    size = size or pipes["torch"].default_size
    rows = []
    for batch in batches:
        for stage in STAGES:
            inputs = stage_inputs(pipes["torch"], stage, batch, size, size)
            times = {name: [] for name in pipes}
            for r in range(warmup + repeats):
                order = list(pipes) if r % 2 == 0 else list(reversed(pipes))
                for name in order:
                    start = time.perf_counter()
                    pipes[name].backend.run(stage, **inputs)
                    if r >= warmup:
                        times[name].append((time.perf_counter() - start) * 1e3)
            medians = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"stage": stage, "batch": batch, "size": size, "threads": threads, **medians})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'stage':14s} {'batch':>5s} {'torch ms':>10s} {'ORT ms':>10s} {'speedup':>8s}"]
    for row in rows:
        speedup = row["torch"] / row["onnxruntime"]
        lines.append(
            f"{row['stage']:14s} {row['batch']:5d} {row['torch']:10.2f} {row['onnxruntime']:10.2f} {speedup:7.2f}x"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    rows = stage_latency(args.model, args.batches, args.repeats, size=args.size, threads=args.threads,
                         cache_dir=args.cache_dir)  # fmt: skip
    first = rows[0]
    print(f"{args.model}, {first['size']}x{first['size']}, CPU float32, {first['threads']} threads, "
          f"median of {args.repeats} interleaved repeats (U-Net batch = 2 x images: guidance)")  # fmt: skip
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
