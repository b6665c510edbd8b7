"""The report: markdown and HTML files exist, reference every plot, the plots are PNGs; bad inputs refused."""

import json
import shutil
from pathlib import Path

import pytest

from diffrt.bench.report import write_report

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _throughput(tmp_path) -> Path:
    record = {"schema": 1, "kind": "throughput", "env": {"device": "cpu"}, "settings": {"model": "tiny"},
              "metrics": {"rows": [{"batch": 1, "total_ms_p50": 10.0, "total_ms_min": 9.0, "images_per_s": 100.0},
                                   {"batch": 2, "total_ms_p50": 15.0, "total_ms_min": 14.0, "images_per_s": 133.3}],
                          "knee_batch": 2, "stopped": "reached --max-batch 2"}}  # fmt: skip
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(record))
    return path


def test_report_references_every_plot_and_plots_are_pngs(tmp_path):
    inputs = [RESULTS / "latency-tiny-cpu.json", RESULTS / "samplers-gmm-64d.json", _throughput(tmp_path)]
    md_path, html_path = write_report(inputs, tmp_path / "report")
    markdown, page = md_path.read_text(), html_path.read_text()
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        assert (tmp_path / "report" / png).read_bytes()[:8] == PNG_MAGIC
        assert f"({png})" in markdown and f'alt="{png}"' in page
    assert page.count("data:image/png;base64,") == 3  # self-contained
    assert "| onnxruntime | 8 |" in markdown and "<table>" in page and "knee" in markdown


def test_other_schema_versions_and_kinds_are_refused(tmp_path):
    wrong = tmp_path / "old.json"
    wrong.write_text(json.dumps({"schema": 0, "kind": "latency"}))
    with pytest.raises(ValueError, match="schema 0; this diffrt reads schema 1"):
        write_report([wrong], tmp_path / "r")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"schema": 1, "kind": "weather"}))
    with pytest.raises(ValueError, match="kind 'weather'"):
        write_report([odd], tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        write_report([tmp_path / "missing.json"], tmp_path / "r")
    assert not (tmp_path / "r").exists()  # nothing written when an input is bad


def test_report_from_copied_results_folder(tmp_path):
    shutil.copy(RESULTS / "latency-tiny-cpu.json", tmp_path / "a.json")
    md_path, _ = write_report([tmp_path / "a.json"], tmp_path / "out")
    assert "latency (a.json)" in md_path.read_text()


def test_serving_and_batch_results_get_their_tables(tmp_path):
    inputs = [RESULTS / "serve-fashion-lcm-cpu.json", RESULTS / "serve-fashion-lcm-server-cpu.json",
              RESULTS / "batch-fashion-lcm" / "w2-c1-r1.json"]
    md_path, html_path = write_report(inputs, tmp_path / "report")
    markdown = md_path.read_text()
    assert "| http://127.0.0.1:8000/b8/ | 8 | offline | 28.79 |" in markdown  # the median of the three rounds
    assert "max rate with p99 <= 1 s: 19.76 req/s" in markdown
    assert "| fashion-lcm | 2 | 1.0 | 8 | 256 | 0 |" in markdown and "<table>" in html_path.read_text()
