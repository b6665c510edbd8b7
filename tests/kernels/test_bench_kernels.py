"""bench/kernels.py: argument parsing, result format, the no-CUDA error (the timing itself needs a GPU)."""

import argparse
import json

import pytest
import torch

pytest.importorskip("triton")

from diffrt.bench import kernels as bench_kernels  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser()
    bench_kernels.add_arguments(parser)
    return parser.parse_args(argv)


def test_arguments():
    args = _parse([])
    assert args.models == ["sd15", "sdxl"] and args.dtype == "float16" and args.run is bench_kernels.run
    args = _parse(["--models", "sdxl", "--kernels", "attention", "--dtype", "bfloat16", "--repeats", "5"])
    assert args.models == ["sdxl"] and args.kernels == ["attention"] and args.repeats == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        bench_kernels.run(_parse(["-o", str(tmp_path / "r.json")]))
    assert not (tmp_path / "r.json").exists()


def test_table_and_json(tmp_path):
    gn_row = dict(model="sd15", shape=[2, 320, 64, 64], triton_gbps=2500.0, torch_gbps=900.0,
                  copy_gbps=2900.0, speedup_vs_torch=2.7, fraction_of_copy=0.86,
                  max_abs_err=1e-3)  # fmt: skip
    at_row = dict(model="sdxl", shape=[2, 10, 4096, 77, 64], triton_tflops=200.0, sdpa_tflops=180.0,
                  speedup_vs_sdpa=1.1, max_abs_err=2e-3)  # fmt: skip
    result = {"settings": {}, "metrics": {"group_norm": [gn_row], "attention": [at_row],
                                          "summary": {"attention_geomean_speedup_vs_sdpa": 1.1}}}  # fmt: skip
    table = bench_kernels.format_table(result)
    assert "2x320x64x64" in table and "2,10,4096,77,64" in table and "86%" in table


@pytest.mark.gpu
def test_small_run_on_gpu(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--models", "sd15", "--warmup", "1", "--repeats", "3", "-o", str(out)]
    assert bench_kernels.run(_parse(argv)) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == 1 and result["metrics"]["group_norm"] and result["metrics"]["attention"]
    assert all(r["triton_gbps"] > 0 for r in result["metrics"]["group_norm"])


def test_the_transformer_row_benchmarks_run_and_agree_with_diffusers_eager_ops():
    """The row-kernel benchmarks' code on the CPU (interpreter) with a stand-in timer: their fused calls agree
    with the eager ops they are timed against (the GB/s themselves need a GPU)."""
    import torch

    def timing(candidates):  # each candidate runs once; the times are placeholders for the arithmetic
        for fn in candidates.values():
            fn()
        return {name: 1.0 + k for k, name in enumerate(candidates)}

    rows = bench_kernels._bench_adaln((2, 5, 48), torch.float32, timing, device="cpu")
    rows.append(bench_kernels._bench_qk_norm((1, 18, 2, 16), torch.float32, timing, device="cpu"))
    assert [r["kernel"] for r in rows] == ["adaln", "gated_residual_adaln", "qk_norm_rope"]
    assert all(r["max_abs_err"] < 1e-4 and r["bytes"] > 0 and r["fraction_of_copy"] > 0 for r in rows), rows
    table = bench_kernels.format_table({"metrics": {"group_norm": [], "attention": [],
                                                    "rows": [{"model": "flux", **r} for r in rows]}})  # fmt: skip
    assert "Transformer row kernels" in table and "qk_norm_rope" in table
