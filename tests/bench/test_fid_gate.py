"""`diffrt bench fid`: the verdict, the baseline checks, and the gate on the shipped default model."""

import json
from pathlib import Path

import pytest

from diffrt.bench import fid
from diffrt.bench.harness import write_result
from diffrt.cli import main
from diffrt.models import embedded

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASELINE = REPO / "bench" / "baselines" / "fashion-flow-euler-8steps-200.json"
GATE_MODEL = "fashion-flow"  # the quality gate (issue 6) runs here, in-process (8 Euler steps: cheaper than 20)
GATE_ARGS = ["--model", GATE_MODEL, "--sampler", "euler", "--steps", "8", "--samples", "200"]
needs_gate_model = pytest.mark.skipif(GATE_MODEL not in embedded.shipped(), reason=f"{GATE_MODEL} not shipped")

SETTINGS = {"model": "fashion", "weights": "abc", "sampler": "dpmpp_2m", "steps": 8, "samples": 200, "seed": 0,
            "guidance": 4.0, "height": 32, "width": 32, "prompts": "canonical"}  # fmt: skip
METRICS = {"fid": 10.0, "kid_mean": 0.01, "kid_std": 0.001, "adherence": 0.9}


def test_verdict_passes_within_tolerance_and_fails_beyond():
    assert fid.verdict(METRICS, {**METRICS, "fid": 11.4}, tolerance=0.15, adherence_drop=0.05)[0]
    assert fid.verdict(METRICS, {**METRICS, "adherence": 0.86}, tolerance=0.15, adherence_drop=0.05)[0]
    passed, lines = fid.verdict(METRICS, {**METRICS, "fid": 11.6}, tolerance=0.15, adherence_drop=0.05)
    assert not passed and "REGRESSION" in lines[0]
    passed, lines = fid.verdict(METRICS, {**METRICS, "adherence": 0.84}, tolerance=0.15, adherence_drop=0.05)
    assert not passed and "REGRESSION" in lines[1]


def test_baseline_of_other_settings_is_refused_naming_them(tmp_path):
    path = write_result(tmp_path / "b.json", "fid", SETTINGS, METRICS)
    baseline = fid.read_baseline(path)
    fid.check_comparable(baseline, dict(SETTINGS), path)  # same settings: accepted
    both = "sampler: baseline 'dpmpp_2m', this run 'euler'; steps: baseline 8, this run 1"
    with pytest.raises(ValueError, match=both):
        fid.check_comparable(baseline, {**SETTINGS, "steps": 1, "sampler": "euler"}, path)
    with pytest.raises(ValueError, match="model: baseline 'fashion', this run 'fashion-flow'"):
        fid.check_comparable(baseline, {**SETTINGS, "model": "fashion-flow"}, path)
    with pytest.raises(ValueError, match="weights: baseline 'abc', this run 'def'"):
        fid.check_comparable(baseline, {**SETTINGS, "weights": "def"}, path)
    with pytest.raises(ValueError, match="cache: baseline None, this run 'deepcache:interval=3'"):
        fid.check_comparable(baseline, {**SETTINGS, "cache": "deepcache:interval=3"}, path)


def test_bad_baseline_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--update-baseline"):
        fid.read_baseline(tmp_path / "none.json")
    other_kind = write_result(tmp_path / "lat.json", "latency", {}, {})
    with pytest.raises(ValueError, match="'latency' result, not a 'fid' baseline"):
        fid.read_baseline(other_kind)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": 0, "kind": "fid"}))
    with pytest.raises(ValueError, match="schema 0"):
        fid.read_baseline(old)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--samples", "25"], "multiple of 10"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--model", "no-such-model"], "neither an embedded model"),
    ],
)
def test_cli_bad_input(args, match, tmp_path, capsys):
    baseline = write_result(tmp_path / "b.json", "fid", SETTINGS, METRICS)
    assert main(["bench", "fid", "--baseline", str(baseline), *args]) == 2
    assert match in capsys.readouterr().err


@needs_gate_model
def test_default_model_meets_its_stored_baseline(tmp_path, capsys):
    """The CI quality gate: the shipped flow model at its stored setting against the stored baseline."""
    out = tmp_path / "run.json"
    assert main(["bench", "fid", *GATE_ARGS, "--baseline", str(DEFAULT_BASELINE), "--out", str(out)]) == 0
    assert "PASS" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["kind"] == "fid" and record["settings"]["model"] == GATE_MODEL
    assert (record["settings"]["sampler"], record["settings"]["steps"], record["settings"]["samples"]) == (
        "euler", 8, 200)  # fmt: skip


def test_the_step_cache_meets_its_stored_baseline(capsys):
    """The step cache's gate: DeepCache at interval 3 on the default model, 20 dpmpp_2m steps, 200 images."""
    baseline = REPO / "bench" / "baselines" / "fashion-deepcache3-dpmpp_2m-20steps-200.json"
    argv = ["bench", "fid", "--model", "fashion", "--sampler", "dpmpp_2m", "--steps", "20", "--samples", "200",
            "--cache", "deepcache:interval=3", "--baseline", str(baseline)]  # fmt: skip
    assert main(argv) == 0
    assert "cache deepcache:interval=3, 200 images" in capsys.readouterr().out
    assert main([*argv[:-4], "--cache", "deepcache:interval=4", "--baseline", str(baseline)]) == 2
    assert "cache: baseline 'deepcache:interval=3', this run 'deepcache:interval=4'" in capsys.readouterr().err


@needs_gate_model
def test_one_euler_step_fails_the_gate(tmp_path):
    """A degraded sampler (one Euler step) measured under the baseline's protocol fails the verdict."""
    import diffrt

    baseline = fid.read_baseline(DEFAULT_BASELINE)
    pipe = diffrt.load(GATE_MODEL, device="cpu")
    degraded = fid.measure(pipe, {**baseline["settings"], "sampler": "euler", "steps": 1})
    passed, lines = fid.verdict(baseline["metrics"], degraded, fid.DEFAULT_TOLERANCE, fid.DEFAULT_ADHERENCE_DROP)
    assert not passed, lines


@needs_gate_model
def test_update_baseline_then_gate_passes_and_changed_settings_are_refused(tmp_path, capsys):
    baseline = tmp_path / "base.json"
    small = ["--model", GATE_MODEL, "--sampler", "euler", "--steps", "2", "--samples", "20"]
    assert main(["bench", "fid", *small, "--baseline", str(baseline), "--update-baseline"]) == 0
    assert main(["bench", "fid", *small, "--baseline", str(baseline)]) == 0
    assert "PASS" in capsys.readouterr().out
    changed = [*small[:-1], "30"]
    assert main(["bench", "fid", *changed, "--baseline", str(baseline)]) == 2
    assert "samples: baseline 20, this run 30" in capsys.readouterr().err


def test_unknown_sampler_is_named(tmp_path, capsys):
    baseline = write_result(tmp_path / "b.json", "fid", SETTINGS, METRICS)
    assert main(["bench", "fid", "--sampler", "warp", "--samples", "10", "--baseline", str(baseline)]) == 2
    assert "unknown sampler 'warp'" in capsys.readouterr().err
