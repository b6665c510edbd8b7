"""``diffrt bench realsize``: every path of diffrt on the published architectures (random weights), on this
machine: pass or fail, wall time and peak memory per (model, path).

Each path runs in a fresh process (``python -m diffrt.bench.realsize_child``), one at a time, under a time limit;
the peak memory is the largest resident set of that process and its children (``diffrt serve``'s Ray workers),
sampled every half second. A path that needs another's output (the ONNX Runtime call needs the export and the
torch call's images, the warm AOT load needs the package) is skipped, saying why, when that one failed in the
same run; run alone, it reads that output from ``--work``. The
paths:

- ``load``; ``step`` (one denoiser call at the model's size, guidance as its defaults); ``call`` (text encoding,
  ``--steps`` denoising steps and the VAE decoder: a whole image);
- ``onnx-fp32``, ``onnx-fp16``: every graph exported (its parity with torch checked by the export), into a
  folder that is deployed when the family allows; ``onnxruntime-fp32/-fp16``: that folder run on ONNX Runtime,
  the images compared with the torch call's;
- ``aot``: ``compile:aot=true``, the AOTInductor package built (the first call); ``aot-warm``: a fresh process
  loading it;
- ``lora``: a random rank-64 LoRA in PEFT layout on every linear layer of the denoiser, loaded and switched;
- ``controlnet``: a ControlNet of the model's own architecture (SD 1.5's for sd15), random weights;
- ``cache``: the step cache (DeepCache on U-Nets, first-block cache on transformers);
- ``serve``: ``diffrt serve`` on a local Ray cluster answering one request.

Reduced-depth presets (``flux-dev:blocks=2,2:text_blocks=2``) keep the published widths; their names say so in
every row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .harness import write_result

PATHS = ("load", "step", "call", "onnx-fp32", "onnxruntime-fp32", "onnx-fp16", "onnxruntime-fp16", "aot", "aot-warm",
         "lora", "controlnet", "cache", "serve")  # fmt: skip
NEEDS = {"onnxruntime-fp32": ("onnx-fp32", "call"), "onnxruntime-fp16": ("onnx-fp16", "call"), "aot-warm": ("aot",)}
# the published architectures this machine runs (size: their native or the issue's), and real-width reduced-depth
# variants of those that do not fit in 24 GB (FLUX.1-dev's 12B transformer, SD3.5 Large's 8B, T5-XXL)
MODELS = {
    "sd15": {"size": 512}, "sd21": {"size": 512}, "sdxl": {"size": 1024},
    "sd35-large:blocks=2:text_blocks=2": {"size": 1024}, "flux-dev:blocks=2,2:text_blocks=2": {"size": 1024},
}  # fmt: skip
CONTROLNET_FAMILIES = ("sd", "sdxl")  # diffrt runs ControlNets on U-Nets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of presets (reduced-depth variants "
                        "as NAME:blocks=N[,M][:text_blocks=K]); default: the published set")  # fmt: skip
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    parser.add_argument("--size", type=int, default=None, help="image size for every model (default: each one's)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the whole call (default 2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per path (default 3600)")
    parser.add_argument("--work", default=None, help="folder for exports and packages (default: a temporary one)")
    parser.add_argument("--out", default="realsize.json", help="JSON result file (rewritten after every path)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the rows already in --out and replace only "
        "those run now (each row says when and at what size it was measured)",
    )
    parser.set_defaults(run=run)


def _names(text: str, allowed, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in allowed for n in names):
        raise ValueError(f"{what} takes a comma list of {', '.join(allowed)}, got {text!r}")
    return names


def _model_list(text: str) -> list[str]:
    """Models separated by commas, where a blocks= value may hold commas itself (``flux-dev:blocks=2,2``)."""
    names: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if names and part[:1].isdigit():  # a count of the previous blocks= value
            names[-1] += "," + part
        elif part:
            names.append(part)
    return names


class PeakMemory:
    """The largest summed resident set of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_path(path: str, model: str, work: Path, settings: dict, timeout: float) -> dict:
    """One path in a fresh process: status, wall time, peak memory and what it measured (or its error)."""
    report = work / f"{path}.report.json"
    report.unlink(missing_ok=True)
    log = work / f"{path}.log"
    command = [sys.executable, "-m", "diffrt.bench.realsize_child", path, model, str(work), json.dumps(settings),
               str(report)]  # fmt: skip
    env = dict(os.environ, DIFFRT_CACHE=str(work / "cache"))
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        memory = PeakMemory(child.pid)
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            child.wait()
            code = None
        peak = memory.stop()
    row = {"status": "pass", "wall_s": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak / 1e9, 2)}
    if code is None:
        return {**row, "status": "fail", "error": f"stopped after the time limit of {timeout:.0f} s"}
    if code != 0 or not report.is_file():
        return {**row, "status": "fail", "error": _last_error(log, code)}
    return {**row, **json.loads(report.read_text())}


def _last_error(log: Path, code: int) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    if code < 0 or code == 137:
        return f"killed by signal {abs(code)} (out of memory?)" + (f": {lines[-1]}" if lines else "")
    return lines[-1][-400:] if lines else f"exit status {code}, no output"


def skip_reason(path: str, model: str, rows: dict) -> str | None:
    """Why ``path`` cannot run on ``model`` now (a prerequisite failed, or the family has no such path)."""
    from ..models import presets

    family = presets.resolve(model).family
    if path == "controlnet" and family not in CONTROLNET_FAMILIES:
        return f"diffrt runs ControlNets on U-Nets, not on {family} transformers yet"
    for needed in NEEDS.get(path, ()):  # a path not in this run: its output is looked for in the work folder
        if needed in rows and rows[needed]["status"] != "pass":
            return f"needs {needed}, which did not pass"
    return None


def run(args) -> int:
    from ..core.optional import require
    from ..models import presets

    require("psutil", feature="diffrt bench realsize")
    models = _model_list(args.models)
    for model in models:
        if not presets.is_preset(model):
            raise ValueError(f"--models takes presets (or NAME:blocks=... variants), got {model!r}")
        presets.resolve(model)  # a bad option fails now
    paths = _names(args.paths, PATHS, "--paths")
    if args.steps < 1 or args.timeout <= 0:
        raise ValueError(f"need --steps >= 1 and --timeout > 0, got {args.steps}, {args.timeout}")
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="diffrt-realsize-"))
    results = earlier_rows(args.out) if args.update else {}
    for model in models:
        if results.get(model, {"size": _size(model, args)})["size"] != _size(model, args):
            raise ValueError(
                f"--update: {args.out} holds {model} at {results[model]['size']}px, not "
                f"{_size(model, args)}px: write this size to another --out"
            )
    settings_all = {"models": models, "paths": paths, "steps": args.steps, "dtype": args.dtype,
                    "timeout_s": args.timeout}  # fmt: skip
    for model in models:
        size = _size(model, args)
        settings = {"size": size, "dtype": args.dtype, "steps": args.steps, "prompt": "a red sneaker on a table"}
        work = root / model.replace(":", "_").replace(",", "-").replace("=", "")
        work.mkdir(parents=True, exist_ok=True)
        rows = results.setdefault(model, {"size": size, "paths": {}})["paths"]
        fresh: dict = {}  # this run's rows: a prerequisite is judged by them, not by an earlier run's
        for path in paths:
            reason = skip_reason(path, model, fresh)
            row = {"status": "skip", "why": reason} if reason else run_path(path, model, work, settings, args.timeout)
            rows[path] = fresh[path] = {**row, "size": size, "measured_utc": _now()}
            print(f"{model:40s} {path:18s} {_cell(rows[path])}", flush=True)
            write_result(args.out, "realsize", settings_all, {"models": results})
    print(table({"models": results}))
    print(f"wrote {write_result(args.out, 'realsize', settings_all, {'models': results})}")
    return 0


def _size(model: str, args) -> int:
    from ..models import presets

    return args.size or MODELS.get(model, {}).get("size") or presets.resolve(model).default_size


def earlier_rows(out) -> dict:
    """The models and rows of an earlier result file (none when there is no file yet)."""
    from ..core.results import read_result

    if not Path(out).is_file():
        return {}
    record = read_result(out, kinds=("realsize",))
    models = record["metrics"].get("models")
    if not isinstance(models, dict):
        raise ValueError(f"{out}: metrics.models must be a JSON object of models")
    for model in models.values():
        for row in model["paths"].values():  # rows of files written before rows were stamped
            row.setdefault("size", model["size"])
            row.setdefault("measured_utc", record["env"].get("date_utc"))
    return models


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _why(error: str, width: int = 70) -> str:
    """A failure's reason for a table cell: the message without its exception's name or the log line after it."""
    if error.startswith("killed by signal"):
        return error.split(": ")[0]
    message = re.sub(r"^[\w.]+(Error|Exception): ", "", error)
    return message if len(message) <= width else message[: width - 3] + "..."


def _cell(row: dict) -> str:
    if row["status"] == "skip":
        return f"skip ({row['why']})"
    text = f"{row['status']} {row['wall_s']:.0f} s, {row['peak_rss_gb']:.1f} GB"
    return text if row["status"] == "pass" else f"{text}: {row.get('error', '')[:120]}"


def table(metrics: dict) -> str:
    """Markdown: a row per path, a column per model; each cell pass/fail, wall seconds and peak GB."""
    models = list(metrics["models"])
    paths = [p for p in PATHS if any(p in metrics["models"][m]["paths"] for m in models)]
    header = "| path | " + " | ".join(f"{m} ({metrics['models'][m]['size']}px)" for m in models) + " |"
    rows = [header, "|---|" + "---|" * len(models)]
    for path in paths:
        cells = []
        for model in models:
            row = metrics["models"][model]["paths"].get(path)
            if row is None:
                cells.append("-")
            elif row["status"] == "skip":
                cells.append(f"skip: {row['why']}")
            else:
                mark = "pass" if row["status"] == "pass" else "**fail**"
                other_size = row.get("size", metrics["models"][model]["size"]) != metrics["models"][model]["size"]
                at = f" at {row['size']}px" if other_size else ""
                why = f": {_why(row['error'])}" if row["status"] == "fail" else ""
                cells.append(f"{mark}{at}, {row['wall_s']:.0f} s, {row['peak_rss_gb']:.1f} GB{why}")
        rows.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
