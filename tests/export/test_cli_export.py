"""`diffrt export` and `diffrt generate --backend onnxruntime` from the command line (in-process)."""

import importlib.util
import json

import pytest
from PIL import Image

from diffrt.cli import main


def test_export_onnx_writes_graphs_and_a_manifest(tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "tiny", "--format", "onnx", "--precision", "fp32", "--out", str(out),
                 "--graphs", "text_encoder", "vae_decoder"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["graphs"]) == ["text_encoder", "vae_decoder"]
    assert (out / "vae_decoder.onnx").is_file()
    printed = capsys.readouterr().out
    assert "vae_decoder" in printed and "parity" in printed and "manifest.json" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "onnx", "--precision", "bf16"], "ONNX export precision must be fp32 or fp16"),
        (["--format", "onnx", "--opset", "9"], r"opset for the torchscript exporter must be an integer in \[14, 20\]"),
        (["--format", "onnx", "--graphs", "unet_2"], "unknown graph"),
        (["--exporter", "dynamo", "--opset", "17"], r"opset for the dynamo exporter must be an integer in \[18, 23\]"),
    ],
)
def test_export_errors_are_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    code = main(["export", "tiny", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.replace("\\", "").split("[")[0] in err.replace("\\", "") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_export_tensorrt_without_tensorrt_names_the_install(tmp_path, capsys):
    assert main(["export", "tiny", "--format", "tensorrt", "--precision", "fp16", "--out", str(tmp_path)]) == 2
    assert "pip install tensorrt" in capsys.readouterr().err


def test_generate_on_onnxruntime(tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "a red sneaker", "--model", "tiny", "--backend", "onnxruntime", "--steps", "2",
                 "--seed", "0", "-o", str(out)])  # fmt: skip
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert "denoising" in capsys.readouterr().out


def test_stage_latency_benchmark_runs_both_backends(tmp_path):
    from diffrt.bench.stages import format_table, stage_latency

    rows = stage_latency("tiny", batches=(1,), repeats=1, warmup=0, size=32, cache_dir=tmp_path)
    assert [r["stage"] for r in rows] == ["text_encoder", "unet", "vae_decoder"]
    assert all(r["torch"] > 0 and r["onnxruntime"] > 0 for r in rows)
    assert "speedup" in format_table(rows)
