"""``diffrt bench gpu``: the dry run on the CPU (what CI can check of the one command a lent GPU runs)."""

import json
import time

import pytest
import torch

from diffrt.bench import gpu_suite
from diffrt.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU form; a GPU runs the real one")
def test_the_dry_run_runs_every_part_and_says_why_cuda_ones_skip(tmp_path, capsys):
    start = time.monotonic()
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 0
    assert time.monotonic() - start < 120
    record = json.loads((tmp_path / "gpu-suite.json").read_text())
    assert record["schema"] == 1 and record["kind"] == "gpu-suite" and "device" in record["env"]
    parts = record["metrics"]
    assert list(parts) == list(gpu_suite.PARTS)
    assert parts["tests"]["status"] == parts["kernels"]["status"] == parts["compile"]["status"] == "skipped"
    assert parts["dit-compile"]["status"] == "skipped"
    assert "CUDA" in parts["tests"]["detail"] and "CUDA" in parts["kernels"]["detail"]
    for part in ("latency", "embedded", "parity", "lora", "controlnet"):
        assert parts[part]["status"] == "passed", parts[part]
    assert parts["lora"]["metrics"]["backends"]["torch"]["switch_ms"]["p50"] > 0
    assert set(parts["controlnet"]["metrics"]) == {"torch", "torch+controlnet"}
    tiny = parts["latency"]["runs"]["tiny"]["metrics"]["torch"]["batches"]["1"]
    assert tiny["total_ms_p50"] > 0  # the latency command's own result, inlined
    parity = parts["parity"]["backends"]["torch-bfloat16"]
    assert 0 < parity["max_abs_error"] <= parity["tolerance"]  # bf16 differs from fp32, within the bound
    table = capsys.readouterr().out
    assert all(part in table for part in gpu_suite.PARTS)


def test_a_part_that_overruns_is_killed_and_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_suite.LIMITS_S, "embedded", 1)  # three model loads cannot finish in 1 s
    result = gpu_suite._spawn("embedded", tmp_path)
    assert result == {"status": "timed out", "seconds": 1, "detail": "killed after 1 s"}


def test_unknown_parts_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['speed'\]; parts: tests, kernels"):
        gpu_suite.run(type("Args", (), {"out": str(tmp_path), "part": None, "parts": "tests,speed"})())


def test_junit_outcomes(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                      '<testcase classname="a" name="bad"><failure/></testcase>'
                      '<testcase classname="b" name="gone"><skipped/></testcase></testsuite></testsuites>')  # fmt: skip
    assert gpu_suite._junit_outcomes(report) == {"a::ok": "passed", "a::bad": "failed", "b::gone": "skipped"}


def test_backend_variants_for_latency():
    from diffrt.core.backend_spec import parse as backend_spec

    assert backend_spec("compile:mode=reduce-overhead") == ("compile", {"mode": "reduce-overhead"})
    assert backend_spec("triton:capture_loop=false:max_graphs=4") == ("triton", {"capture_loop": False,
                                                                                  "max_graphs": 4})  # fmt: skip
    with pytest.raises(ValueError, match="backend option 'fast' in 'compile:fast' must be key=value"):
        backend_spec("compile:fast")
    with pytest.raises(ValueError, match="must start with its name"):
        backend_spec(":aot=true")
