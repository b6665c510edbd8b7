"""``diffrt bench realsize``: each path in a fresh process with its time and peak memory, prerequisites that
failed skip the paths needing them, a failing path is a row (not a crash), and the table. Run here on the tiny
preset; the real-size run is a benchmark (bench/results/realsize-*.json)."""

import argparse
import json

import pytest

from diffrt.bench import realsize, realsize_child
from diffrt.models import presets


def _args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    realsize.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "rs.json"), "--work", str(tmp_path / "work")])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_paths_run_in_fresh_processes_and_are_recorded(tmp_path, capsys):
    args = _args(tmp_path, models="tiny", paths="call,onnx-fp32,onnxruntime-fp32,lora,cache")
    assert realsize.run(args) == 0
    record = json.loads((tmp_path / "rs.json").read_text())
    assert record["kind"] == "realsize" and record["settings"]["models"] == ["tiny"]
    rows = record["metrics"]["models"]["tiny"]["paths"]
    for path in ("call", "onnx-fp32", "onnxruntime-fp32", "lora", "cache"):
        assert rows[path]["status"] == "pass", rows[path]
        assert rows[path]["wall_s"] > 0 and rows[path]["peak_rss_gb"] > 0.05
    assert rows["onnx-fp32"]["deployable"] and rows["onnxruntime-fp32"]["deployed"]
    assert rows["onnxruntime-fp32"]["max_pixel_difference"] <= realsize_child.FP32_PIXELS
    assert rows["lora"]["lora_layers"] > 10  # every linear layer of the U-Net
    assert rows["cache"]["cached_calls"] > 0
    assert "| onnxruntime-fp32 | pass, " in capsys.readouterr().out


def test_a_failing_path_is_a_row_with_its_error(tmp_path):
    args = _args(tmp_path, models="tiny", paths="onnxruntime-fp32")
    work = tmp_path / "work" / "tiny"
    work.mkdir(parents=True)
    row = realsize.run_path("onnxruntime-fp32", "tiny", work, {"size": 64, "dtype": "float32", "steps": 1,
                                                                "prompt": "x"}, 120)  # fmt: skip
    assert row["status"] == "fail" and "manifest.json" in row["error"]  # no export there: one line of why
    assert realsize.run(args) == 0  # the failure is a row of the result, not a crash
    record = json.loads((tmp_path / "rs.json").read_text())
    assert record["metrics"]["models"]["tiny"]["paths"]["onnxruntime-fp32"]["status"] == "fail"
    # a path whose prerequisite failed in the same run is skipped, saying which; ControlNets need a U-Net
    assert realsize.skip_reason("aot-warm", "tiny", {"aot": {"status": "fail"}}) == "needs aot, which did not pass"
    assert realsize.skip_reason("aot-warm", "tiny", {}) is None  # run alone: the package is looked for in --work
    assert "ControlNets on U-Nets" in realsize.skip_reason("controlnet", "tiny-flux", {})


def test_reduced_depth_variants_are_named_in_rows_and_checked_first(tmp_path):
    assert realsize._model_list("sd15, flux-dev:blocks=2,2:text_blocks=2,tiny") == [
        "sd15", "flux-dev:blocks=2,2:text_blocks=2", "tiny"]  # fmt: skip
    assert "REDUCED DEPTH" in presets.resolve("flux-dev:blocks=2,2").notes
    with pytest.raises(ValueError, match="blocks= takes 2 count"):
        realsize.run(_args(tmp_path, models="flux-dev:blocks=2"))
    with pytest.raises(ValueError, match="--paths takes a comma list"):
        realsize.run(_args(tmp_path, models="tiny", paths="load,teleport"))


def test_update_replaces_only_the_paths_run_now(tmp_path):
    assert realsize.run(_args(tmp_path, models="tiny", paths="load,step")) == 0
    first = json.loads((tmp_path / "rs.json").read_text())["metrics"]["models"]["tiny"]["paths"]
    assert realsize.run(_args(tmp_path, models="tiny", paths="step", update=True)) == 0
    rows = json.loads((tmp_path / "rs.json").read_text())["metrics"]["models"]["tiny"]["paths"]
    assert rows["load"] == first["load"]  # kept as it was measured
    assert rows["step"]["status"] == "pass" and rows["step"]["measured_utc"] >= first["step"]["measured_utc"]
    assert rows["step"]["size"] == first["step"]["size"]
    with pytest.raises(ValueError, match="holds tiny at .* write this size to another --out"):
        realsize.run(_args(tmp_path, models="tiny", paths="step", update=True, size=96))
