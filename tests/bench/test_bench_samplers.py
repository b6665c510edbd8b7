"""``diffrt bench samplers``: a quick run, the result file's schema, the plot, and argument errors."""

import argparse
import json

import pytest

from diffrt.bench import samplers as bench
from diffrt.cli import main


def _args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_run_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "res.json"
    args = _args("--dim", "2", "--samplers", "heun,ddpm", "--nfe", "2,3", "--batch", "8", "--samples", "64",
                 "--out", str(out))
    assert bench.run(args) == 0
    record = json.loads(out.read_text())
    assert record["schema"] == 1 and record["kind"] == "samplers"
    assert {"device", "cpu", "cpu_count", "python", "torch", "triton", "onnxruntime", "tensorrt",
            "git_commit", "date_utc"} <= set(record["env"])
    assert record["settings"]["nfe"] == [2, 3] and record["settings"]["model"] == "gmm"
    heun, ddpm = record["metrics"]["samplers"]["heun"], record["metrics"]["samplers"]["ddpm"]
    assert heun["steps"] == [None, 2] and heun["error"][0] is None and heun["error"][1] > 0  # heun: 2n - 1 NFE
    assert not heun["stochastic"] and heun["metric"] == "rms_error"
    assert ddpm["stochastic"] and ddpm["metric"] == "energy_distance" and ddpm["steps"] == [2, 3]
    assert record["metrics"]["energy_distance_floor"] >= 0
    assert (tmp_path / "res.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "heun" in table and "ddpm" in table and "energy distance" in table


@pytest.mark.parametrize(
    "argv, allowed",
    [(("--model", "unet"), "gmm"), (("--samplers", "euler,warp"), "dpmpp_2m"), (("--nfe", "0,3"), "--nfe")],
)
def test_bad_arguments_raise_value_error_naming_allowed(tmp_path, argv, allowed):
    with pytest.raises(ValueError, match=allowed):
        bench.run(_args(*argv, "--out", str(tmp_path / "r.json")))
    assert not (tmp_path / "r.json").exists()


def test_cli_reports_value_errors_as_exit_2(tmp_path, capsys):
    assert main(["bench", "samplers", "--model", "unet", "--out", str(tmp_path / "r.json")]) == 2
    assert "allowed: gmm" in capsys.readouterr().err


def test_write_result_is_atomic_and_refuses_nan(tmp_path):
    from diffrt.bench.harness import write_result

    path = write_result(tmp_path / "sub" / "r.json", "k", {"a": 1}, {"m": [1.0, None]})
    assert json.loads(path.read_text())["metrics"] == {"m": [1.0, None]}
    with pytest.raises(ValueError):
        write_result(path, "k", {}, {"m": float("nan")})
    assert json.loads(path.read_text())["metrics"] == {"m": [1.0, None]}  # the old file survives
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp files left
