"""``diffrt bench coldstart``: from a fresh process to the first image written, per way of running a model.

Each run is a new Python process (``python -m diffrt.bench.coldstart_child``) timed by this one from spawn to
exit, with the child's own breakdown: importing torch and diffrt, ``diffrt.load`` (with the export or
compilation it triggers when nothing is cached), the first call, writing the PNG. Setups:

- ``torch``, ``compile``, ``onnxruntime``: ``diffrt.load(MODEL, backend=...)``, with options as on the command
  line (``compile:aot=true``: AOTInductor packages, :mod:`diffrt.backends.aot`).
- ``deployed``: ``diffrt.load(DIR, backend="onnxruntime")`` on a folder ``diffrt export`` wrote (timed once,
  as its one-off ``export_s``): no diffusers, transformers or torch modules.

Caches: each ``cold`` run gets an empty diffrt cache (the ONNX export cache, and the compile backend's
TorchInductor cache and artifacts, which live inside it); the ``warm`` run after it keeps what it filled.
Nothing comes from Inductor's default folder in /tmp. Runs are interleaved by repeat. ``cli_s``: the same
first image through the ``diffrt generate`` command, once per setup, warm.

Start: ``fast`` imports and loads inside ``diffrt.fast_start()`` (the garbage collector paused, as
``diffrt generate`` does); ``plain`` is a script that imports and loads as written. ``--start fast,plain``
measures both side by side (cells labelled ``.../plain``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core.backend_spec import parse as parse_backend
from .harness import percentiles, write_result

SETUPS = ("torch", "compile", "onnxruntime", "deployed")
CACHED = ("compile", "onnxruntime")  # setups with a cold and a warm cache (the others cache nothing)
STARTS = ("fast", "plain")
PHASES = ("import_s", "load_s", "first_call_s", "write_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="fashion-lcm", help="embedded model, preset or diffusers folder")
    parser.add_argument("--backend", default="torch,onnxruntime,deployed",
                        help=f"comma list of {', '.join(SETUPS)}, with options as NAME:KEY=VALUE "
                             "(compile:aot=true); compile's cold run takes minutes")  # fmt: skip
    parser.add_argument("--start", default="fast",
                        help="comma list: fast (inside diffrt.fast_start(), as diffrt generate), plain")
    parser.add_argument("--repeat", type=int, default=3, help="runs per setup and cache state")
    parser.add_argument("--prompt", default="a shirt")
    parser.add_argument("--out", default="coldstart.json", help="JSON result file")
    parser.set_defaults(run=run)


def parse_setups(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if parse_backend(n)[0] not in SETUPS or n.startswith("deployed:")]
    if unknown or not names:
        raise ValueError(f"--backend takes a comma list of {', '.join(SETUPS)} (options as NAME:KEY=VALUE), "
                         f"got {text!r}")  # fmt: skip
    return names


def parse_starts(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in STARTS for n in names):
        raise ValueError(f"--start takes a comma list of {', '.join(STARTS)}, got {text!r}")
    return names


def _environment(root: Path) -> dict:
    """A child's environment: its own diffrt cache under ``root`` (the compile backend keeps TorchInductor's
    cache inside it: nothing is reused from /tmp or from another setup)."""
    env = dict(os.environ, DIFFRT_CACHE=str(root / "diffrt-cache"))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_INTERPRET"):
        env.pop(name, None)
    return env


def _child(args, source: str, backend: str, start: str, env: dict, out: Path) -> dict:
    """One fresh process: its wall time from spawn to exit and its own phase times."""
    report = out.with_suffix(".json")
    command = [sys.executable, "-m", "diffrt.bench.coldstart_child", source, backend, args.prompt, str(out),
               str(report), start]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"coldstart run {backend} on {source} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"wall_s": wall, **json.loads(report.read_text())}


def _cli(source: str, backend: str, prompt: str, env: dict, out: Path) -> float:
    """Wall time of ``diffrt generate`` for the same first image."""
    command = [shutil.which("diffrt") or "diffrt", "generate", "--model", source, "--backend", backend, prompt,
               "-o", str(out)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"diffrt generate with {backend} on {source} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def _export(model: str, folder: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffrt.cli", "export", model, "--format", "onnx", "--out",
                           str(folder)], env=env, capture_output=True, text=True, timeout=3600)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"diffrt export {model} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def measure(args, root: Path) -> dict:
    setups, starts = parse_setups(args.backend), parse_starts(args.start)
    if not isinstance(args.repeat, int) or args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat!r}")
    cells = {}
    for setup in setups:
        states = ("cold", "warm") if parse_backend(setup)[0] in CACHED else ("warm",)
        cells.update({(setup, state, start): [] for state in states for start in starts})
    deployed = root / "deployed"
    export_s = _export(args.model, deployed, _environment(root / "export")) if "deployed" in setups else None
    for r in range(args.repeat):
        for (setup, state, start), runs in cells.items():
            run_root = root / f"{setup}-{start}-{r}"
            if state == "cold":
                shutil.rmtree(run_root, ignore_errors=True)
            run_root.mkdir(parents=True, exist_ok=True)
            source, backend = _source(args, setup, deployed)
            runs.append(_child(args, source, backend, start, _environment(run_root), run_root / f"{state}.png"))
            print(f"  {_label(setup, state, start):28s} run {r + 1}: {runs[-1]['wall_s']:.2f} s", flush=True)
    metrics = {"export_s": export_s, "setups": {}}
    for (setup, state, start), runs in cells.items():
        cell = {"wall_s": percentiles([run["wall_s"] for run in runs])["p50"], "runs": runs}
        cell.update({phase: percentiles([run[phase] for run in runs])["p50"] for phase in PHASES})
        if state == "warm" and start == "fast":  # diffrt generate starts fast
            run_root = root / f"{setup}-{start}-0"
            source, backend = _source(args, setup, deployed)
            cell["cli_s"] = _cli(source, backend, args.prompt, _environment(run_root), run_root / "cli.png")
        metrics["setups"][_label(setup, state, start)] = cell
    return metrics


def _source(args, setup: str, deployed: Path) -> tuple[str, str]:
    """What the child loads and with which backend (and options)."""
    return (str(deployed), "onnxruntime") if setup == "deployed" else (args.model, setup)


def _label(setup: str, state: str, start: str) -> str:
    return f"{setup}/{state}" + ("/plain" if start == "plain" else "")


def summarize(metrics: dict) -> None:
    print(f"{'setup':28s} {'wall s':>7s} {'import':>7s} {'load':>7s} {'1st call':>8s} {'write':>6s} {'cli s':>6s}")
    for label, cell in metrics["setups"].items():
        cli = f"{cell['cli_s']:6.2f}" if cell.get("cli_s") is not None else f"{'-':>6s}"
        print(f"{label:28s} {cell['wall_s']:7.2f} {cell['import_s']:7.2f} {cell['load_s']:7.2f} "
              f"{cell['first_call_s']:8.2f} {cell['write_s']:6.2f} {cli}")  # fmt: skip
    if metrics.get("export_s") is not None:
        print(f"deployed folder exported once in {metrics['export_s']:.1f} s (diffrt export, not in the walls)")


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="diffrt-coldstart-") as tmp:
        metrics = measure(args, Path(tmp))
    summarize(metrics)
    settings = {"model": args.model, "setups": parse_setups(args.backend), "starts": parse_starts(args.start),
                "repeat": args.repeat, "prompt": args.prompt}
    write_result(args.out, "coldstart", settings, metrics)
    print(f"wrote {args.out}")
    return 0
