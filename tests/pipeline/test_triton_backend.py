"""The triton backend: patched kernels (interpreter on CPU) give the torch backend's images; on CUDA the
whole denoising loop is one CUDA graph, replayed on later calls with the same shape."""

import os

import pytest
import torch

import diffrt

KW = dict(steps=2, seed=0, height=64, width=64, guidance=4.0, output_type="pt")


@pytest.fixture(scope="module")
def pair():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return diffrt.load("tiny", device=device), diffrt.load("tiny", device=device, backend="triton")


def test_triton_backend_matches_torch(pair):
    eager, fused = pair
    assert fused.backend.name == "triton" and fused.backend.patches[0].fused_norms > 0
    # the interpreter is slow: one (stochastic) sampler
    kw = dict(sampler="euler_ancestral", **KW)
    torch.testing.assert_close(fused("a red sneaker", **kw), eager("a red sneaker", **kw), rtol=1e-4, atol=1e-4)


def test_step_cache_runs_the_patched_modules_and_matches_torch(pair):
    eager, fused = pair
    kw = dict(KW, steps=3, sampler="euler", cache="deepcache:interval=2", height=32, width=32)
    result = fused.generate("a red sneaker", **kw)
    assert (result.stages.full_calls, result.stages.cached_calls) == (2, 1)
    torch.testing.assert_close(result.images, eager("a red sneaker", **kw), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_a_fixed_step_cache_is_captured_with_the_loop(pair):
    eager, fused = pair
    kw = dict(KW, sampler="dpmpp_2m", steps=6, cache="deepcache:interval=3")
    fused.backend.loop_capture.clear()
    first = fused.generate("a red sneaker", **kw)
    assert len(fused.backend.loop_capture) == 1 and first.stages.unet_calls_ms == []
    assert (first.stages.full_calls, first.stages.cached_calls) == (3, 3)
    torch.testing.assert_close(first.images, eager("a red sneaker", **kw), rtol=2e-3, atol=2e-3)


def test_restore_returns_plain_modules(pair):
    from torch import nn

    _, fused = pair
    backend = diffrt.load("tiny", device=fused.device, backend="triton").backend
    backend.restore()
    assert any(type(m) is nn.GroupNorm for m in backend.components.unet.modules())


@pytest.mark.gpu
def test_whole_loop_is_one_cuda_graph_replayed_per_shape(pair):
    eager, fused = pair
    first = fused("a red sneaker", sampler="dpmpp_2m", **KW)
    assert len(fused.backend.loop_capture) == 1 and fused.stages.unet_calls_ms == []
    second = fused("a blue coat", sampler="dpmpp_2m", **KW)  # same shapes: replay with new conditioning
    assert len(fused.backend.loop_capture) == 1
    torch.testing.assert_close(second, eager("a blue coat", sampler="dpmpp_2m", **KW), rtol=2e-3, atol=2e-3)
    fused("a red sneaker", sampler="dpmpp_2m", **{**KW, "height": 128})
    assert len(fused.backend.loop_capture) == 2
    torch.testing.assert_close(first, eager("a red sneaker", sampler="dpmpp_2m", **KW), rtol=2e-3, atol=2e-3)


def test_triton_backend_needs_a_gpu_or_the_interpreter(monkeypatch):
    from diffrt.backends import triton_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = triton_backend.is_available()
    assert not ok and "CUDA GPU" in reason


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3", "fashion-dit"])
def test_the_transformer_families_run_fused_and_match_torch(model, pair):
    """The fused adaLN blocks, query/key norm + rotary embedding and joint attention, through whole pipelines
    (the interpreter runs each program in Python: one step, no guidance, few text tokens; the VAE is tested
    above); fbcache's passes call the same fused blocks."""
    device = pair[0].device
    eager, fused = diffrt.load(model, device=device), diffrt.load(model, device=device, backend="triton")
    assert fused.backend.patches[0].fused_blocks > 0 and fused.backend.patches[0].attention_processors > 0
    kw = dict(KW, steps=1, height=32, width=32, guidance=1.0, sampler="euler", output_type="latent")
    if model != "fashion-dit":
        kw["max_sequence_length"] = 8
    torch.testing.assert_close(fused("a red sneaker", **kw), eager("a red sneaker", **kw), rtol=1e-4, atol=1e-4)
    if model == "tiny-flux":
        cached = dict(kw, steps=3, cache="fbcache:interval=2")
        torch.testing.assert_close(fused("a bag", **cached), eager("a bag", **cached), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_a_transformers_fused_loop_is_one_cuda_graph(model):
    eager = diffrt.load(model, device="cuda", dtype=torch.float16)
    fused = diffrt.load(model, device="cuda", dtype=torch.float16, backend="triton")
    kw = dict(KW, steps=4, sampler="euler", height=64, width=64)
    first = fused.generate("a red sneaker", **kw)
    fused.generate("a blue coat", **kw)  # the same shapes: replayed
    assert len(fused.backend.loop_capture) == 1 and first.stages.unet_calls_ms == []
    torch.testing.assert_close(first.images, eager("a red sneaker", **kw), rtol=2e-2, atol=2e-2)
