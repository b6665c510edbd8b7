"""``diffrt bench latency``: per-stage latency of whole pipeline calls, backends measured side by side.

Backends are interleaved (repeat r runs every backend, in alternating order) so that drift of a shared,
noisy machine hits them alike. Cold start (load, export/compile, first call) is reported apart from the
steady state. Stage times come with each call's result (``Pipeline.generate``): CUDA events on GPU,
perf_counter on CPU. With ``--controlnet`` every backend also runs with the ControlNet(s) loaded (its label gets
``+controlnet``), in the same rounds, and the table ends with each backend's overhead.
"""

from __future__ import annotations

import argparse
import time

from ..core.backend_spec import parse as parse_backend
from .harness import add_call_arguments, fill_call_defaults, percentiles, write_result

STAGES = ("text_encode_ms", "unet_step_ms", "vae_decode_ms", "total_ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="preset name or a local diffusers folder")
    parser.add_argument("--backend", default="torch", help="comma list, e.g. torch,onnxruntime,triton; options "
                        "as compile:mode=reduce-overhead")  # fmt: skip
    add_call_arguments(parser)
    parser.add_argument("--batch", default="1", help="comma list of batch sizes")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per backend and batch")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per backend and batch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                        help="also time each backend with this ControlNet (repeat for several), side by side")
    parser.add_argument("--out", default="latency.json", help="JSON result file")
    parser.set_defaults(run=run)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--{what} must be a comma list of integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise ValueError(f"--{what} values must be >= 1, got {text!r}")
    return values


def _peak_memory_mb(device) -> float:
    """CUDA allocator peak on GPU; the process's peak resident set on CPU (it covers every backend loaded)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


CONTROLLED = "+controlnet"  # the label suffix of a backend run with --controlnet loaded


def _load(label: str, args):
    """Load one backend's pipeline (with the ControlNets when ``label`` says so) and run its first call: the
    cold-start figures."""
    import diffrt

    start = time.perf_counter()
    backend, options = parse_backend(label.removesuffix(CONTROLLED))
    controlnet = args.controlnet if label.endswith(CONTROLLED) else None
    pipe = diffrt.load(args.model, device=args.device, dtype=args.dtype, backend=backend, controlnet=controlnet,
                       **options)  # fmt: skip
    loaded = time.perf_counter()
    fill_call_defaults(args, pipe)
    pipe("warm-up", **_call_kwargs(args, 1, pipe), seed=0)
    first = time.perf_counter()
    return pipe, {"load_s": loaded - start, "first_call_s": first - loaded}


def _call_kwargs(args, batch: int, pipe) -> dict:
    kw = dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance, num_images=batch, output_type="pt")
    if args.height:
        kw["height"] = args.height
    if args.width:
        kw["width"] = args.width
    if pipe.components.controlnets:  # a fixed random picture per ControlNet: the time does not depend on it
        import torch

        size = (kw.get("height") or pipe.default_size, kw.get("width") or pipe.default_size)
        pictures = [torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(k))
                    for k in range(len(pipe.components.controlnets))]  # fmt: skip
        kw["control_image"] = pictures[0] if len(pictures) == 1 else pictures
    return kw


def _stage_samples(stages, steps: int) -> dict[str, list[float]]:
    """Each stage's samples; a captured loop has no per-call times, so its step time is the loop's over ``steps``
    (a loop's sampler updates included, as they are in every replayed graph)."""
    return {
        "text_encode_ms": [stages.text_encode_ms],
        "unet_step_ms": list(stages.unet_calls_ms) or [stages.denoise_ms / steps],
        "vae_decode_ms": [stages.vae_decode_ms],
        "total_ms": [stages.total_ms],
    }


def measure(args) -> tuple[dict, dict]:
    from diffrt import backends

    names = [b.strip() for b in args.backend.split(",") if b.strip()]
    if args.controlnet:  # each backend plain and controlled, side by side
        names = [label for name in names for label in (name, name + CONTROLLED)]
    unknown = sorted({parse_backend(n.removesuffix(CONTROLLED))[0] for n in names} - set(backends.names()))
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; available: {', '.join(backends.names())}")
    batches = _int_list(args.batch, "batch")
    reasons = backends.availability()
    pipes, metrics = {}, {}
    for name in names:
        reason = reasons[parse_backend(name.removesuffix(CONTROLLED))[0]]
        if reason is not None:
            metrics[name] = {"skipped": reason}
            continue
        pipes[name], cold = _load(name, args)
        metrics[name] = {"cold_start": cold, "batches": {}}
    samples = {(n, b): {s: [] for s in STAGES} for n in pipes for b in batches}
    order = list(pipes)
    for batch in batches:
        for name in order:
            for _ in range(args.warmup):
                pipes[name]("a red sneaker", **_call_kwargs(args, batch, pipes[name]), seed=0)
        for r in range(args.repeat):
            for name in order if r % 2 == 0 else order[::-1]:
                result = pipes[name].generate("a red sneaker", **_call_kwargs(args, batch, pipes[name]), seed=r)
                for stage, values in _stage_samples(result.stages, args.steps).items():
                    samples[(name, batch)][stage].extend(values)
    for (name, batch), by_stage in samples.items():
        row = {f"{stage}_{k}": v for stage in STAGES for k, v in percentiles(by_stage[stage]).items()}
        row["unet_it_per_s"] = 1000.0 / row["unet_step_ms_p50"]
        row["images_per_s"] = batch * 1000.0 / row["total_ms_p50"]
        metrics[name]["batches"][str(batch)] = row
    for name, pipe in pipes.items():
        metrics[name]["peak_mem_mb"] = _peak_memory_mb(pipe.device)
    settings = {k: getattr(args, k) for k in ("model", "sampler", "steps", "height", "width", "guidance",
                                              "warmup", "repeat", "device", "dtype", "controlnet")}  # fmt: skip
    settings.update(backends=names, batches=batches, statistic="p50/p90/min over timed calls, interleaved",
                    unet_step="per model call; a captured loop (no per-call times): its denoising time / steps")
    return settings, metrics


def format_table(settings: dict, metrics: dict) -> str:
    width = max(12, *(len(name) for name in metrics))
    lines = [
        f"{'backend':{width}s} {'batch':>5s} {'text p50':>9s} {'unet p50':>9s} {'unet p90':>9s} {'vae p50':>9s} "
        f"{'total p50':>10s} {'total p90':>10s} {'it/s':>7s} {'img/s':>7s}"
    ]
    for name, m in metrics.items():
        if "skipped" in m:
            lines.append(f"{name:{width}s} skipped: {m['skipped']}")
            continue
        for batch, r in m["batches"].items():
            lines.append(
                f"{name:{width}s} {batch:>5s} {r['text_encode_ms_p50']:9.1f} {r['unet_step_ms_p50']:9.1f} "
                f"{r['unet_step_ms_p90']:9.1f} {r['vae_decode_ms_p50']:9.1f} {r['total_ms_p50']:10.1f} "
                f"{r['total_ms_p90']:10.1f} {r['unet_it_per_s']:7.1f} {r['images_per_s']:7.2f}"
            )
    lines.append("(ms; cold start:)")
    for name, m in metrics.items():
        if "cold_start" in m:
            c = m["cold_start"]
            lines.append(f"  {name}: load {c['load_s']:.2f} s, first call {c['first_call_s']:.2f} s, "
                         f"peak memory {m['peak_mem_mb']:.0f} MB")  # fmt: skip
    for name, batch, ratios in controlnet_overheads(metrics):
        lines.append(f"ControlNet overhead, {name} batch {batch}: U-Net step x{ratios['unet_step']:.2f}, "
                     f"whole call x{ratios['total']:.2f} (p50s, same rounds)")  # fmt: skip
    return "\n".join(lines)


def controlnet_overheads(metrics: dict) -> list[tuple[str, str, dict]]:
    """(backend, batch, {unet_step, total}: controlled p50 / plain p50) for each backend run both ways."""
    found = []
    for name, m in metrics.items():
        controlled = metrics.get(name + CONTROLLED)
        if "batches" not in m or not controlled or "batches" not in controlled:
            continue
        for batch, row in m["batches"].items():
            other = controlled["batches"][batch]
            found.append((name, batch, {"unet_step": other["unet_step_ms_p50"] / row["unet_step_ms_p50"],
                                        "total": other["total_ms_p50"] / row["total_ms_p50"]}))  # fmt: skip
    return found


def run(args) -> int:
    settings, metrics = measure(args)
    print(format_table(settings, metrics))
    path = write_result(args.out, "latency", settings, metrics)
    print(f"wrote {path}")
    return 0
