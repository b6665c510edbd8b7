"""``diffrt bench coldstart``: fresh processes timed from spawn to the first image, with their breakdown, the
garbage collector paused (as diffrt generate starts) and not, side by side; its argument checks."""

import argparse
import json

import pytest

from diffrt.bench import coldstart


def _args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    coldstart.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "cold.json"), "--repeat", "1"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_coldstart_times_fresh_processes_and_writes_stamped_json(tmp_path, capsys):
    assert coldstart.run(_args(tmp_path, backend="torch", start="fast,plain")) == 0
    record = json.loads((tmp_path / "cold.json").read_text())
    assert record["kind"] == "coldstart" and {"device", "torch", "date_utc"} <= set(record["env"])
    assert record["settings"]["starts"] == ["fast", "plain"]
    cells = record["metrics"]["setups"]
    assert set(cells) == {"torch/warm", "torch/warm/plain"}
    for cell in cells.values():
        (run,) = cell["runs"]
        assert run["imported"] == ["diffusers", "transformers"]  # the torch backend builds their modules
        assert run["wall_s"] > run["import_s"] + run["load_s"] + run["first_call_s"] > 0
    assert cells["torch/warm"]["cli_s"] > 0 and "cli_s" not in cells["torch/warm/plain"]
    assert "torch/warm/plain" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(backend="torch,jax"), "--backend takes a comma list of torch, compile"),
        (dict(backend="deployed:precision=fp16"), "--backend takes a comma list"),
        (dict(backend="compile:aot"), "backend option 'aot' in 'compile:aot' must be key=value"),
        (dict(start="quick"), "--start takes a comma list of fast, plain, got 'quick'"),
        (dict(repeat=0), "--repeat must be >= 1, got 0"),
    ],
)
def test_bad_arguments(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        coldstart.run(_args(tmp_path, **overrides))
    assert not (tmp_path / "cold.json").exists()


def test_setups_carry_backend_options():
    assert coldstart.parse_setups("torch, compile:aot=true,deployed") == ["torch", "compile:aot=true", "deployed"]
