"""``diffrt bench lora`` on the tiny preset: it runs, writes its JSON and table, and refuses bad arguments."""

import argparse
import json

import pytest
from safetensors.torch import save_file

from diffrt.bench import lora as bench_lora

KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _args(tmp_path, *loras, **overrides):
    parser = argparse.ArgumentParser()
    bench_lora.add_arguments(parser)
    argv = ["--model", "tiny", "--backend", "torch", "--repeat", "2", "--steps", "2", "--out", str(tmp_path / "l.json")]
    for path in loras:
        argv += ["--lora", str(path)]
    args = parser.parse_args(argv)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _lora(path, value):
    import torch

    save_file({f"{KEY}.lora_A.weight": torch.full((2, 16), value), f"{KEY}.lora_B.weight": torch.full((16, 2), value)},
              str(path))  # fmt: skip
    return path


def test_bench_lora_writes_times_per_backend(tmp_path, capsys):
    args = _args(tmp_path, _lora(tmp_path / "a.safetensors", 0.1), _lora(tmp_path / "b.safetensors", -0.1))
    assert bench_lora.run(args) == 0
    record = json.loads((tmp_path / "l.json").read_text())
    torch_row = record["metrics"]["backends"]["torch"]
    assert record["kind"] == "lora" and len(torch_row["load_ms"]) == 2 and torch_row["switch_ms"]["p50"] > 0
    assert torch_row["step_ms_active"]["p50"] > 0 and "| torch |" in capsys.readouterr().out


def test_bench_lora_refuses_bad_arguments(tmp_path):
    one = _lora(tmp_path / "a.safetensors", 0.1)
    with pytest.raises(ValueError, match="one or two adapters"):
        bench_lora.run(_args(tmp_path, one, one, one))
    with pytest.raises(ValueError, match="--repeat must be >= 1"):
        bench_lora.run(_args(tmp_path, one, repeat=0))


def test_random_rank_loras_cover_every_attention_projection(tmp_path):
    from safetensors import safe_open

    paths = bench_lora.random_loras("tiny", 8, tmp_path, "cpu")
    with safe_open(str(paths[0]), "pt") as f:
        keys = list(f.keys())
        down = f.get_tensor(keys[0] if "lora_A" in keys[0] else keys[1])
    assert len(paths) == 2 and down.shape[0] == 8
    for projection in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(k.endswith(f".{projection}.lora_A.weight") for k in keys), projection
    args = _args(tmp_path, random_rank=4)
    assert bench_lora.run(args) == 0
    with pytest.raises(ValueError, match="not both"):
        bench_lora.run(_args(tmp_path, paths[0], random_rank=4))
