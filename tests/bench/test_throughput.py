"""The throughput benchmark: the knee rule, a small real run, and its input checks."""

import argparse
import json

import pytest

from diffrt.bench import throughput


def test_knee_is_the_smallest_batch_near_the_best():
    rows = [{"batch": 1, "images_per_s": 10.0}, {"batch": 2, "images_per_s": 18.5},
            {"batch": 4, "images_per_s": 19.0}, {"batch": 8, "images_per_s": 20.0}]  # fmt: skip
    assert throughput.knee(rows) == 2  # 18.5 >= 0.9 * 20
    assert throughput.knee([]) is None


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path / "t.json"), "--steps", "1", "--repeat", "1", *extra])


def test_run_doubles_the_batch_up_to_the_limit(tmp_path, capsys):
    assert throughput.run(_args(tmp_path, "--max-batch", "4")) == 0
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["kind"] == "throughput"
    assert [r["batch"] for r in record["metrics"]["rows"]] == [1, 2, 4]
    assert record["metrics"]["knee_batch"] in (1, 2, 4)
    assert "knee" in capsys.readouterr().out


def test_bad_limits(tmp_path):
    with pytest.raises(ValueError, match="--max-batch and --repeat must be >= 1"):
        throughput.run(_args(tmp_path, "--max-batch", "0"))


def test_sampling_settings_default_to_the_models_own(tmp_path):
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    args = parser.parse_args(["--model", "fashion-lcm", "--out", str(tmp_path / "t.json"), "--repeat", "1",
                              "--max-batch", "1"])  # fmt: skip
    assert throughput.run(args) == 0
    settings = json.loads((tmp_path / "t.json").read_text())["settings"]
    assert (settings["sampler"], settings["steps"], settings["guidance"]) == ("lcm", 4, 4.0)
