"""``diffrt bench kernels``: the Triton kernels against torch on a CUDA GPU, at SD1.5, SDXL, FLUX.1 and SD3
shapes.

* GroupNorm + SiLU: effective bandwidth in GB/s (bytes = one read of x + one write of y) for
  :func:`diffrt.kernels.group_norm` with ``activation="silu"``, for torch's ``F.group_norm`` followed by
  ``F.silu``, and for a device-to-device ``copy_`` of the same tensor (the same bytes moved: the practical
  bandwidth ceiling).
* Attention: TFLOP/s (``4 * B * H * Lq * Lk * D``, the two matmuls) for :func:`diffrt.kernels.attention`
  and ``F.scaled_dot_product_attention``, on the ``[B, L, H, D]``-strided views diffusers passes (FLUX.1-dev
  at 1024 px: 4096 image + 512 text tokens, 24 heads of 128).
* The transformer blocks' row kernels (FLUX.1 and SD3): adaLN (:func:`adaln_modulate`), the gated residual with
  the next modulated norm (:func:`gated_residual_adaln`) and the query/key RMSNorm with rotary embedding
  (:func:`rms_norm_rope`), in GB/s of the bytes they must move (each input read once, each output written
  once) against diffusers' eager ops for the same step and a ``copy_`` of as many bytes: the ceiling.

Timing: CUDA events around single calls, the L2 cache flushed (a 256 MiB write) before each call, the
candidates of one shape interleaved call by call (order alternating between repeats) after a warm-up, and
the median over repeats reported.  Outputs are checked against torch first (``max_abs_err``).

The result is JSON ``{"schema": 1, "kind": "kernels", "env": ..., "settings": ..., "metrics": ...}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from .harness import write_result

if TYPE_CHECKING:  # annotations only: the command line imports this module without torch
    import torch

# [N, C, H, W] GroupNorm inputs (32 groups) and (B, H, Lq, Lk, D) attention problems, batch 2 = CFG.
GROUP_NORM_SHAPES = {
    "sd15": [  # SD1.5 at 512 px: U-Net latents 64x64, VAE decoder up to 512x512
        (2, 320, 64, 64),
        (2, 640, 32, 32),
        (2, 1280, 16, 16),
        (2, 1280, 8, 8),
        (2, 960, 64, 64),
        (1, 512, 64, 64),
        (1, 512, 256, 256),
        (1, 256, 512, 512),
        (1, 128, 512, 512),
    ],
    "sdxl": [  # SDXL at 1024 px: U-Net latents 128x128, VAE decoder up to 1024x1024
        (2, 320, 128, 128),
        (2, 640, 64, 64),
        (2, 1280, 32, 32),
        (2, 960, 128, 128),
        (2, 2560, 32, 32),
        (1, 512, 128, 128),
        (1, 512, 512, 512),
        (1, 256, 1024, 1024),
        (1, 128, 1024, 1024),
    ],
}
ATTENTION_SHAPES = {
    "sd15": [  # 8 heads, head dims 40 / 80 / 160, text length 77
        (2, 8, 4096, 4096, 40),
        (2, 8, 4096, 77, 40),
        (2, 8, 1024, 1024, 80),
        (2, 8, 1024, 77, 80),
        (2, 8, 256, 256, 160),
        (2, 8, 256, 77, 160),
    ],
    "sdxl": [  # head dim 64; 10 heads at 64x64 latents / 4096 tokens, 20 heads at 1024 tokens
        (2, 10, 4096, 4096, 64),
        (2, 10, 4096, 77, 64),
        (2, 20, 1024, 1024, 64),
        (2, 20, 1024, 77, 64),
    ],
}
ATTENTION_SHAPES["flux"] = [(1, 24, 4608, 4608, 128)]  # FLUX.1-dev, 1024 px: one pass (guidance distilled)
ATTENTION_SHAPES["sd3"] = [(2, 24, 4429, 4429, 64)]  # SD3 medium, 1024 px: 4096 + 333 tokens, CFG batch 2
ROW_SHAPES = {  # [B, tokens, width] of the adaLN kernels and [B, tokens, heads, head_dim] of the query/key norm
    "flux": {"adaln": [(1, 4096, 3072), (1, 512, 3072), (1, 4608, 3072)], "qk_norm": [(1, 4608, 24, 128)]},
    "sd3": {"adaln": [(2, 4096, 1536), (2, 333, 1536)], "qk_norm": [(2, 4429, 24, 64)]},
}
KERNELS = ("group_norm", "attention", "adaln", "qk_norm")
_DTYPES = ("float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=sorted(ATTENTION_SHAPES), default=["sd15", "sdxl"])
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float16")
    parser.add_argument(
        "--channels-last", action="store_true", help="GroupNorm inputs in channels_last memory"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per candidate and shape")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per candidate and shape")
    parser.add_argument("--no-flush", action="store_true", help="do not flush the L2 cache before each call")
    parser.add_argument("-o", "--out", default="bench-kernels.json", help="JSON result path")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = benchmark_kernels(
        models=args.models,
        kernels=args.kernels,
        dtype=args.dtype,
        channels_last=args.channels_last,
        warmup=args.warmup,
        repeats=args.repeats,
        flush_l2=not args.no_flush,
    )
    print(format_table(result))
    path = write_result(args.out, "kernels", result["settings"], result["metrics"])
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------ timing


def time_side_by_side(
    candidates: dict[str, Callable[[], object]], *, warmup: int, repeats: int, flush: torch.Tensor | None
) -> dict[str, float]:
    """Median milliseconds per call of each candidate, measured interleaved with CUDA events."""
    import torch

    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    items = list(candidates.items())
    recorded: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    for r in range(repeats):
        for name, fn in items if r % 2 == 0 else reversed(items):
            if flush is not None:
                flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            recorded.append((name, start, end))
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for name, start, end in recorded:
        samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in samples.items()}


# ------------------------------------------------------------------------------------------------ benchmarks


def _bench_group_norm(shape, dtype, channels_last, timing) -> dict:
    import torch
    import torch.nn.functional as F

    from ..kernels import group_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device="cuda", generator=gen).to(dtype)
    b = torch.randn(shape[1], device="cuda", generator=gen).to(dtype)
    out = torch.empty_like(x)
    copy_dst = torch.empty_like(x)
    groups = 32

    def triton_fn():
        return group_norm(x, groups, w, b, 1e-5, "silu", out=out)

    def torch_fn():
        return F.silu(F.group_norm(x, groups, w, b, 1e-5))

    def copy_fn():
        return copy_dst.copy_(x)

    err = (triton_fn().float() - torch_fn().float()).abs().max().item()
    ms = timing({"triton": triton_fn, "torch": torch_fn, "copy": copy_fn})
    nbytes = 2 * x.numel() * x.element_size()
    gbps = {name: nbytes / (t * 1e-3) / 1e9 for name, t in ms.items()}
    return {
        "shape": list(shape),
        "layout": "channels_last" if channels_last else "nchw",
        "bytes": nbytes,
        "triton_ms": ms["triton"],
        "torch_ms": ms["torch"],
        "copy_ms": ms["copy"],
        "triton_gbps": gbps["triton"],
        "torch_gbps": gbps["torch"],
        "copy_gbps": gbps["copy"],
        "speedup_vs_torch": ms["torch"] / ms["triton"],
        "fraction_of_copy": gbps["triton"] / gbps["copy"],
        "max_abs_err": err,
    }


def _bench_attention(shape, dtype, timing) -> dict:
    import torch
    import torch.nn.functional as F

    from ..kernels import attention

    batch, heads, seq_q, seq_k, head_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tokens(length):  # [B, L, H, D] memory seen as [B, H, L, D], as diffusers' processors do
        t = torch.randn(batch, length, heads, head_dim, device="cuda", generator=gen).to(dtype)
        return t.transpose(1, 2)

    q, k, v = tokens(seq_q), tokens(seq_k), tokens(seq_k)

    def triton_fn():
        return attention(q, k, v)

    def sdpa_fn():
        return F.scaled_dot_product_attention(q, k, v)

    err = (triton_fn().float() - sdpa_fn().float()).abs().max().item()
    ms = timing({"triton": triton_fn, "sdpa": sdpa_fn})
    flops = 4 * batch * heads * seq_q * seq_k * head_dim
    tflops = {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()}
    return {
        "shape": list(shape),
        "flops": flops,
        "triton_ms": ms["triton"],
        "sdpa_ms": ms["sdpa"],
        "triton_tflops": tflops["triton"],
        "sdpa_tflops": tflops["sdpa"],
        "speedup_vs_sdpa": ms["sdpa"] / ms["triton"],
        "max_abs_err": err,
    }


def _bench_adaln(shape, dtype, timing, device="cuda") -> list[dict]:
    """adaLN alone and the gated residual with the next modulated norm, against diffusers' eager ops."""
    import torch
    import torch.nn.functional as F

    from ..kernels.adaln import adaln_modulate, gated_residual_adaln

    gen = torch.Generator(device=device).manual_seed(0)
    x, y = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(2))
    emb = torch.randn(shape[0], 6 * shape[2], device=device, generator=gen).to(dtype)
    shift, scale, gate = emb.chunk(6, dim=1)[:3]
    width = shape[2]

    def eager_adaln(v):
        return F.layer_norm(v, (width,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def eager_gated():
        r = x + gate[:, None] * y
        return r, eager_adaln(r)

    rows = []
    for name, fused, eager, tensors in (
        ("adaln", lambda: adaln_modulate(x, shift, scale), lambda: eager_adaln(x), 2),
        ("gated_residual_adaln", lambda: gated_residual_adaln(x, y, gate, shift, scale), eager_gated, 4),
    ):  # fmt: skip
        rows.append(_row_kernel(name, shape, x, fused, eager, tensors, timing))
    return rows


def _bench_qk_norm(shape, dtype, timing, device="cuda") -> dict:
    """Query RMSNorm + FLUX's rotary embedding into a joint buffer, against diffusers' RMSNorm, concatenation and
    ``apply_rotary_emb``."""
    import torch
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    from ..kernels.qk_norm import rms_norm_rope

    batch, tokens, heads, head_dim = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, tokens, heads * head_dim, device=device, generator=gen).to(dtype).unflatten(-1, (heads,
                    head_dim))  # fmt: skip
    norm = RMSNorm(head_dim, eps=1e-6).to(device, dtype)
    angles = torch.rand(tokens, head_dim // 2, device=device, generator=gen) * 6.28
    rope = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    split = tokens // 9  # a text part and an image part, as FLUX joins them
    joint = torch.empty_like(q, memory_format=torch.contiguous_format)

    def fused():
        rms_norm_rope(q[:, :split], norm.weight, 1e-6, rope, out=joint, offset=0)
        return rms_norm_rope(q[:, split:], norm.weight, 1e-6, rope, out=joint, offset=split)

    def eager():
        return apply_rotary_emb(torch.cat([norm(q[:, :split]), norm(q[:, split:])], dim=1), rope, sequence_dim=1)

    return _row_kernel("qk_norm_rope", shape, q, fused, eager, 2, timing)


def _row_kernel(name, shape, x, fused, eager, tensors, timing) -> dict:
    """GB/s of ``fused`` and ``eager`` over the bytes of ``tensors`` activation-sized reads and writes, and of a
    copy moving as many bytes (``tensors / 2`` copies of ``x``)."""
    import torch

    copies = [torch.empty_like(x) for _ in range(tensors // 2)]

    def copy_fn():
        for dst in copies:
            dst.copy_(x)

    fused_out, eager_out = fused(), eager()
    fused_out = fused_out if isinstance(fused_out, tuple) else (fused_out,)
    eager_out = eager_out if isinstance(eager_out, tuple) else (eager_out,)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(fused_out, eager_out, strict=True))
    ms = timing({"triton": fused, "torch": eager, "copy": copy_fn})
    nbytes = tensors * x.numel() * x.element_size()
    gbps = {key: nbytes / (t * 1e-3) / 1e9 for key, t in ms.items()}
    return {"kernel": name, "shape": list(shape), "bytes": nbytes, **{f"{k}_ms": v for k, v in ms.items()},
            **{f"{k}_gbps": v for k, v in gbps.items()}, "speedup_vs_torch": ms["torch"] / ms["triton"],
            "fraction_of_copy": gbps["triton"] / gbps["copy"], "max_abs_err": err}  # fmt: skip


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def benchmark_kernels(
    *,
    models=("sd15", "sdxl"),
    kernels=("group_norm", "attention"),
    dtype: str = "float16",
    channels_last: bool = False,
    warmup: int = 10,
    repeats: int = 50,
    flush_l2: bool = True,
) -> dict:
    """Run the benchmark and return the result dict (see the module docstring)."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError(
            "diffrt bench kernels needs a CUDA GPU: the Triton kernels are benchmarked against torch on CUDA"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    unknown = [m for m in models if m not in ATTENTION_SHAPES]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {sorted(ATTENTION_SHAPES)}")
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        raise ValueError(f"unknown kernels {bad}; choose from {', '.join(KERNELS)}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    torch_dtype = getattr(torch, dtype)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if flush_l2 else None

    def timing(candidates):
        return time_side_by_side(candidates, warmup=warmup, repeats=repeats, flush=flush)

    metrics: dict = {"group_norm": [], "attention": [], "rows": []}
    with torch.inference_mode():
        for model in models:
            if "group_norm" in kernels:
                for shape in GROUP_NORM_SHAPES.get(model, []):
                    row = _bench_group_norm(shape, torch_dtype, channels_last, timing)
                    metrics["group_norm"].append({"model": model, **row})
            if "attention" in kernels:
                for shape in ATTENTION_SHAPES[model]:
                    metrics["attention"].append(
                        {"model": model, **_bench_attention(shape, torch_dtype, timing)}
                    )
            shapes = ROW_SHAPES.get(model, {})
            if "adaln" in kernels:
                for shape in shapes.get("adaln", []):
                    metrics["rows"] += [{"model": model, **r} for r in _bench_adaln(shape, torch_dtype, timing)]
            if "qk_norm" in kernels:
                for shape in shapes.get("qk_norm", []):
                    metrics["rows"].append({"model": model, **_bench_qk_norm(shape, torch_dtype, timing)})
    metrics["summary"] = {
        "group_norm_geomean_speedup_vs_torch": _geomean(
            [r["speedup_vs_torch"] for r in metrics["group_norm"]]
        ),
        "group_norm_geomean_fraction_of_copy": _geomean(
            [r["fraction_of_copy"] for r in metrics["group_norm"]]
        ),
        "attention_geomean_speedup_vs_sdpa": _geomean([r["speedup_vs_sdpa"] for r in metrics["attention"]]),
        "row_kernels_geomean_fraction_of_copy": _geomean([r["fraction_of_copy"] for r in metrics["rows"]]),
        "row_kernels_geomean_speedup_vs_torch": _geomean([r["speedup_vs_torch"] for r in metrics["rows"]]),
    }
    settings = {
        "models": list(models),
        "kernels": list(kernels),
        "dtype": dtype,
        "channels_last": channels_last,
        "warmup": warmup,
        "repeats": repeats,
        "flush_l2": flush_l2,
        "statistic": "median",
        "group_norm_groups": 32,
        "group_norm_bytes": "2 * numel * element_size (read x, write y)",
        "attention_flops": "4 * B * H * Lq * Lk * D",
        "row_kernel_bytes": "activation-sized tensors read or written once (adaln 2, gated+norm 4, qk norm 2)",
    }
    return {"settings": settings, "metrics": metrics}


def format_table(result: dict) -> str:
    lines = []
    gn = result["metrics"]["group_norm"]
    if gn:
        lines.append("GroupNorm+SiLU (GB/s, median)")
        lines.append(f"{'model':6} {'shape':>22} {'triton':>8} {'torch':>8} {'copy':>8} {'x torch':>8} "
                     f"{'of copy':>8} {'max err':>9}")  # fmt: skip
        for r in gn:
            shape = "x".join(str(s) for s in r["shape"])
            lines.append(
                f"{r['model']:6} {shape:>22} {r['triton_gbps']:8.0f} {r['torch_gbps']:8.0f} "
                f"{r['copy_gbps']:8.0f} "
                f"{r['speedup_vs_torch']:8.2f} {r['fraction_of_copy']:8.0%} {r['max_abs_err']:9.2e}"
            )
    at = result["metrics"]["attention"]
    if at:
        lines.append("")
        lines.append("Attention (TFLOP/s, median)")
        lines.append(
            f"{'model':6} {'B,H,Lq,Lk,D':>24} {'triton':>8} {'sdpa':>8} {'x sdpa':>8} {'max err':>9}"
        )
        for r in at:
            shape = ",".join(str(s) for s in r["shape"])
            lines.append(
                f"{r['model']:6} {shape:>24} {r['triton_tflops']:8.1f} {r['sdpa_tflops']:8.1f} "
                f"{r['speedup_vs_sdpa']:8.2f} {r['max_abs_err']:9.2e}"
            )
    rows = result["metrics"].get("rows", [])
    if rows:
        lines.append("")
        lines.append("Transformer row kernels (GB/s, median)")
        lines.append(f"{'model':6} {'kernel':22} {'shape':>18} {'triton':>8} {'torch':>8} {'copy':>8} {'x torch':>8} "
                     f"{'of copy':>8} {'max err':>9}")  # fmt: skip
        for r in rows:
            shape = "x".join(str(v) for v in r["shape"])
            lines.append(f"{r['model']:6} {r['kernel']:22} {shape:>18} {r['triton_gbps']:8.0f} {r['torch_gbps']:8.0f} "
                         f"{r['copy_gbps']:8.0f} {r['speedup_vs_torch']:8.2f} {r['fraction_of_copy']:8.0%} "
                         f"{r['max_abs_err']:9.2e}")  # fmt: skip
    summary = result["metrics"].get("summary", {})
    if summary:
        lines.append("")
        lines.extend(f"{key}: {value:.3f}" for key, value in summary.items() if value is not None)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffrt.bench.kernels", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
