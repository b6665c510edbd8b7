"""Export-test fixtures: the tiny preset, a tiny SDXL-shaped model, and exports shared by the tests."""

import importlib.util

import pytest

import diffrt
from diffrt.models.presets import Preset

if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")):
    collect_ignore_glob = ["test_*.py"]  # the export tests need the [onnx] extra

_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, hidden_act="gelu",
             projection_dim=32, max_position_embeddings=77, vocab_size=1000, bos_token_id=998, eos_token_id=999,
             pad_token_id=999)  # fmt: skip

# SDXL's structure at toy size: two text encoders (the second projected: pooled embeddings), text_time conditioning
TINY_SDXL = Preset(
    "tiny-sdxl", "sdxl",
    dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
         up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[16, 32], layers_per_block=1,
         cross_attention_dim=64, attention_head_dim=[2, 4], use_linear_projection=True,
         addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
         norm_num_groups=8),
    dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
         latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.13025),
    [_CLIP, {**_CLIP, "with_projection": True}],
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
     "prediction_type": "epsilon"},
    vocab_size=1000, default_size=32, notes="tiny SDXL-shaped test model, random weights",
    defaults={"steps": 3, "sampler": "euler", "guidance": 5.0},
)  # fmt: skip


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Nothing a test exports lands in the user's ~/.cache."""
    monkeypatch.setenv("DIFFRT_CACHE", str(tmp_path_factory.getbasetemp() / "diffrt-cache"))


@pytest.fixture(scope="session")
def tiny():
    return diffrt.load("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_sdxl():
    import torch

    from diffrt.backends import create
    from diffrt.models import presets
    from diffrt.pipeline.pipe import Pipeline

    components = presets.load(TINY_SDXL)
    return Pipeline(components, create("torch", components, torch.device("cpu"), torch.float32),
                    torch.device("cpu"), torch.float32)  # fmt: skip


@pytest.fixture(scope="session")
def fp32_export(tiny, tmp_path_factory):
    from diffrt.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx-fp32")
    return folder, export_onnx(tiny, folder, precision="fp32")


@pytest.fixture(scope="session")
def fp16_export(tiny, tmp_path_factory):
    from diffrt.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx-fp16")
    return folder, export_onnx(tiny, folder, precision="fp16")
