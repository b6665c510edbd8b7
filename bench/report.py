"""``diffrt bench report``: one markdown report with tables and PNG plots, and one self-contained HTML page
(plots embedded), from result files of the latency, throughput, samplers, fid, cache and coldstart benchmarks."""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import tempfile
from pathlib import Path

from ..core.files import TEMP_PREFIX
from ..core.optional import require
from ..core.results import read_result

STAGES = ("text_encode_ms", "unet_step_ms", "vae_decode_ms", "total_ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="result JSON files written by diffrt bench commands")
    parser.add_argument("-o", "--out", default="report", help="output folder (report.md, report.html, PNGs)")
    parser.set_defaults(run=run)


def load_result(path) -> dict:
    """A result file this report can show (checked: JSON, schema, a known kind)."""
    record = read_result(path, kinds=tuple(SECTIONS))
    record["_source"], record["_path"] = Path(path).name, str(path)
    return record


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> str:
    """Write a figure as a PNG in the report folder and free it; returns the file name."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _plt().close(fig)
    return name


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _latency(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    rows, plot_rows = [], []
    for backend, m in record["metrics"].items():
        if "skipped" in m:
            rows.append([backend, "-", f"skipped: {m['skipped']}", "", "", "", "", ""])
            continue
        for batch, r in m["batches"].items():
            rows.append([backend, batch, *(f"{r[s + '_p50']:.1f}" for s in STAGES), f"{r['total_ms_p90']:.1f}",
                         f"{r['images_per_s']:.2f}"])  # fmt: skip
            plot_rows.append((f"{backend}\nbatch {batch}", [r[s + "_p50"] for s in STAGES]))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(plot_rows), 1)
    for k, (label, values) in enumerate(plot_rows):
        ax.bar([i + k * width for i in range(len(STAGES))], values, width, label=label.replace("\n", " "))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(STAGES))], [s.replace("_ms", "") for s in STAGES])
    ax.set_ylabel("ms (p50)")
    ax.set_title(f"latency by stage: {record['settings'].get('model')}")
    ax.legend(fontsize=8)
    name = _save(fig, out, f"latency-{index}.png")
    header = ["backend", "batch", *(f"{s} p50" for s in STAGES), "total_ms p90", "images/s"]
    return _table(header, rows), [name]


def _throughput(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    m = record["metrics"]
    rows = [[r["batch"], f"{r['total_ms_p50']:.1f}", f"{r['images_per_s']:.2f}",
             "knee" if r["batch"] == m["knee_batch"] else ""] for r in m["rows"]]  # fmt: skip
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["batch"] for r in m["rows"]], [r["images_per_s"] for r in m["rows"]], marker="o")
    if m["knee_batch"] is not None:
        ax.axvline(m["knee_batch"], linestyle="--", color="gray", label=f"knee (batch {m['knee_batch']})")
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("images/s")
    ax.set_title(f"throughput: {record['settings'].get('model')} on {record['settings'].get('backend')}")
    name = _save(fig, out, f"throughput-{index}.png")
    return _table(["batch", "total ms p50", "images/s", ""], rows) + f"\n\n{m['stopped']}", [name]


def _samplers(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    curves = record["metrics"]["samplers"]
    nfes = sorted({n for c in curves.values() for n in c["nfe"]})
    rows = []
    for label, c in curves.items():
        by_nfe = dict(zip(c["nfe"], c["error"], strict=True))
        cells = [f"{by_nfe[n]:.2e}" if by_nfe.get(n) is not None else "-" for n in nfes]
        rows.append([label, c["metric"], *cells])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, c in curves.items():
        points = [(n, e) for n, e in zip(c["nfe"], c["error"], strict=True) if e is not None]
        ax.plot(*zip(*points, strict=True), marker=".", linestyle="--" if c["stochastic"] else "-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model calls (NFE)")
    ax.set_ylabel("error (solid: RMS to the ODE reference; dashed: energy distance)")
    ax.set_title("quality against NFE")
    ax.legend(fontsize=7, ncol=2)
    name = _save(fig, out, f"samplers-{index}.png")
    return _table(["sampler", "metric", *(f"NFE {n}" for n in nfes)], rows), [name]


def _model_samplers(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    """Trained-model sweep: adherence, domain FID and time per image by steps; FID and adherence against NFE."""
    curves = record["metrics"]["curves"]
    steps = sorted({n for c in curves.values() for n in c["steps"]})
    rows = []
    for label, c in curves.items():
        cells = {n: (a, f, t) for n, a, f, t in zip(c["steps"], c["adherence"], c["fid"], c["seconds_per_image"],
                                                     strict=True)}  # fmt: skip
        rows.append([label, *(f"{cells[n][0]:.3f} / {cells[n][1]:.2f} / {1e3 * cells[n][2]:.1f}" if n in cells
                              else "-" for n in steps)])  # fmt: skip
    plt = _plt()
    fig, (ax_fid, ax_adh) = plt.subplots(1, 2, figsize=(10, 4))
    for label, c in curves.items():
        ax_fid.plot(c["nfe"], c["fid"], marker=".", label=label)
        ax_adh.plot(c["nfe"], c["adherence"], marker=".", label=label)
    for ax, what in ((ax_fid, "domain FID (lower is better)"), (ax_adh, "prompt adherence")):
        ax.set_xscale("log")
        ax.set_xlabel("model calls (NFE)")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    ax_fid.set_yscale("log")
    fig.suptitle(f"{record['settings'].get('model')}: quality against NFE")
    name = _save(fig, out, f"model-samplers-{index}.png")
    header = ["sampler", *(f"{n} steps" for n in steps)]
    note = "\n\nCells: adherence / domain FID / ms per image (generation only)."
    return _table(header, rows) + note, [name]


def _fid(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    s, m = record["settings"], record["metrics"]
    row = [s.get("model"), s.get("sampler"), s.get("steps"), s.get("samples"), f"{m['fid']:.3f}",
           f"{m['kid_mean']:.5f} ± {m['kid_std']:.5f}", f"{m['adherence']:.3f}"]  # fmt: skip
    return _table(["model", "sampler", "steps", "images", "domain FID", "KID", "adherence"], [row]), []


def _cache(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    """Step cache against fewer steps: the table of cells, the verdicts, and the quality-against-time plot."""
    from .cache import plot, verdicts

    cells = record["metrics"]["cells"]
    rows = [[c["label"], c["full_calls"], c["cached_calls"], f"{c['full_equivalent_calls']:.1f}",
             f"{c['ms_per_image']:.1f}", f"{c['denoise_speedup']:.2f}x",
             f"{c['adherence']:.3f}" if "adherence" in c else "-", f"{c['fid']:.3f}" if "fid" in c else "-",
             "yes" if c.get("pareto") else ""] for c in cells]  # fmt: skip
    header = ["cell", "full calls", "cached calls", "full-equivalent calls", "ms per image", "denoising speedup",
              "adherence", "domain FID", "Pareto"]  # fmt: skip
    said = "\n".join(f"- `{label}`: {verdict}" for label, verdict in verdicts(cells).items())
    pngs = []
    if all("fid" in c for c in cells):
        s = record["settings"]
        pngs.append(f"cache-{index}.png")
        plot(cells, f"{s.get('model')}: step cache against fewer steps", out / pngs[0])
    return _table(header, rows) + ("\n\n" + said if said else ""), pngs


def _coldstart(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    """Fresh process to first image: per setup and cache state, the wall time and its breakdown."""
    rows = [[label, f"{c['wall_s']:.2f}", f"{c['import_s']:.2f}", f"{c['load_s']:.2f}", f"{c['first_call_s']:.2f}",
             f"{c['write_s']:.2f}", f"{c['cli_s']:.2f}" if c.get("cli_s") is not None else "-"]
            for label, c in record["metrics"]["setups"].items()]  # fmt: skip
    header = ["setup/cache", "wall s", "import s", "load s", "first call s", "write s", "diffrt generate s"]
    return _table(header, rows), []


def _lora(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    """LoRA load / switch / unload per backend, the step with and without an adapter, and its effect."""
    from .lora import table

    return table(record["metrics"]), []


def _serve(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    """Load scenarios per endpoint: images/s, latency percentiles, the Server scenario's rate."""
    from .serve import HEADER, rows

    return _table(HEADER, rows(record["settings"], record["metrics"])), []


def _batch(record: dict, out: Path, index: int) -> tuple[str, list[str]]:
    """``diffrt batch --result``: workers, rows made and the rates with and without the start-up."""
    s, m = record["settings"], record["metrics"]
    steady = m.get("steady_images_per_s")
    row = [s.get("model"), s.get("workers"), s.get("worker_cpus") or "default", s.get("batch_size"), m["made"],
           m["skipped"], f"{m['wall_s']:.1f}", f"{m['images_per_s']:.2f}", f"{steady:.2f}" if steady else "-"]
    header = ["model", "workers", "CPUs each", "batch size", "made", "skipped", "wall s", "images/s",
              "images/s after the first batch"]  # fmt: skip
    return _table(header, [row]), []


SECTIONS = {
    "latency": _latency, "throughput": _throughput, "samplers": _samplers, "samplers-model": _model_samplers,
    "fid": _fid, "cache": _cache, "coldstart": _coldstart, "lora": _lora,
    "serve": _serve, "batch": _batch,
}  # fmt: skip


def _env_line(env: dict) -> str:
    keys = ("device", "cpu", "cpu_count", "torch", "onnxruntime", "triton", "tensorrt", "git_commit", "date_utc")
    return ", ".join(f"{k}: {env.get(k)}" for k in keys if k in env)


def write_report(paths, out) -> tuple[Path, Path]:
    """Render every result into a temporary folder first: a malformed file is an error naming it, and leaves
    ``out`` as it was; then the plots and pages move into ``out``."""
    records = [load_result(p) for p in paths]  # all checked before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=TEMP_PREFIX) as tmp_name:
        tmp = Path(tmp_name)
        parts = ["# diffrt benchmark report"]
        for index, record in enumerate(records):
            parts += _section(record, tmp, index)
        (tmp / "report.md").write_text("\n\n".join(parts) + "\n")
        (tmp / "report.html").write_text(_html(parts, tmp))
        for file in tmp.iterdir():
            os.replace(file, out / file.name)
    return out / "report.md", out / "report.html"


def _section(record: dict, out: Path, index: int) -> list[str]:
    try:
        table, pngs = SECTIONS[record["kind"]](record, out, index)
        environment = _env_line(record.get("env", {}))
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as err:
        raise ValueError(f"{record['_path']}: a {record['kind']!r} result without the fields this report reads "
                         f"({type(err).__name__}: {err}); was it written by another diffrt version?") from None
    parts = [f"## {record['kind']} ({record['_source']})", f"Environment: {environment}",
             f"Settings: `{json.dumps(record['settings'], default=str)}`", table]  # fmt: skip
    return parts + [f"![{png}]({png})" for png in pngs]


def _html(parts: list[str], out: Path) -> str:
    """The same content as the markdown, with tables as HTML and the plots embedded as data URIs."""
    body = []
    for part in parts:
        if part.startswith("# "):
            body.append(f"<h1>{html.escape(part[2:])}</h1>")
        elif part.startswith("## "):
            body.append(f"<h2>{html.escape(part[3:])}</h2>")
        elif part.startswith("!["):
            png = part[part.index("(") + 1 : -1]
            data = base64.b64encode((out / png).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(png)}" src="data:image/png;base64,{data}">')
        elif part.startswith("|"):
            body.append(_html_table(part))
        else:
            body.append(f"<p>{html.escape(part)}</p>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"  # fmt: skip
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" \
           + "\n".join(body) + "</body></html>\n"  # fmt: skip


def _html_table(markdown_table: str) -> str:
    lines = [line for line in markdown_table.splitlines() if line.startswith("|") and not line.startswith("|---")]
    rows = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows[1:])
    tail = markdown_table.split("\n\n", 1)[1] if "\n\n" in markdown_table else ""
    return f"<table><tr>{head}</tr>{body}</table>" + (f"<p>{html.escape(tail)}</p>" if tail else "")


def run(args) -> int:
    require("matplotlib", feature="diffrt bench report (its plots)")
    md_path, html_path = write_report(args.results, args.out)
    print(f"wrote {md_path} and {html_path}")
    return 0
