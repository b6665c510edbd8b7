"""The latency benchmark: statistics against numpy, the JSON it writes, and its input checks."""

import argparse
import json

import numpy as np
import pytest

from diffrt.bench import latency
from diffrt.bench.harness import percentiles


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], list(range(10)), [0.1, 7.5, 2.2, 9.9, 4.4, 4.4, 1.0]])
def test_percentiles_match_numpy(values):
    got = percentiles(values)
    assert got["p50"] == pytest.approx(np.percentile(values, 50))
    assert got["p90"] == pytest.approx(np.percentile(values, 90))
    assert got["p99"] == pytest.approx(np.percentile(values, 99))
    assert got["min"] == min(values)
    with pytest.raises(ValueError, match="empty"):
        percentiles([])


def _args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    latency.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "lat.json"), "--repeat", "2", "--warmup", "0",
                              "--steps", "2", "--batch", "1,2"])  # fmt: skip
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_latency_run_writes_stamped_json(tmp_path, capsys):
    assert latency.run(_args(tmp_path, backend="torch")) == 0
    record = json.loads((tmp_path / "lat.json").read_text())
    assert record["schema"] == 1 and record["kind"] == "latency"
    assert {"device", "torch", "cpu_count", "date_utc"} <= set(record["env"])
    row = record["metrics"]["torch"]["batches"]["2"]
    assert row["total_ms_p50"] >= row["unet_step_ms_p50"] > 0 and row["images_per_s"] > 0
    assert record["metrics"]["torch"]["cold_start"]["load_s"] > 0
    assert "img/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(backend="torch,jax"), r"unknown backend\(s\) \['jax'\]"),
        (dict(batch="1,x"), "--batch must be a comma list"),
        (dict(batch="0"), "--batch values must be >= 1"),
    ],
)
def test_bad_arguments(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        latency.run(_args(tmp_path, **overrides))


def test_sampling_settings_default_to_the_models_own(tmp_path):
    """Unset --sampler/--steps/--guidance run (and record) the model's diffrt.json defaults: an LCM is timed
    with its own sampler, not a solver it was never trained for."""
    args = _args(tmp_path, model="fashion-lcm", backend="torch", steps=None, batch="1")
    assert latency.run(args) == 0
    settings = json.loads((tmp_path / "lat.json").read_text())["settings"]
    assert (settings["sampler"], settings["steps"], settings["guidance"]) == ("lcm", 4, 4.0)
