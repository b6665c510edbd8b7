"""Microbenchmarks (pytest-benchmark). Skipped by the normal run (``--benchmark-skip`` in pyproject);
run them with ``python -m pytest tests/bench/test_microbench.py --benchmark-only``."""

import pytest
import torch

import diffrt


@pytest.fixture(scope="module")
def tiny_unet_step():
    pipe = diffrt.load("tiny", device="cuda" if torch.cuda.is_available() else "cpu")
    sample = torch.randn(2, 4, 8, 8, device=pipe.device)
    context = torch.randn(2, 77, 32, device=pipe.device)
    timestep = torch.full((2,), 500.0, device=pipe.device)

    def step():
        out = pipe.backend.run("unet", sample=sample, timestep=timestep, encoder_hidden_states=context)["out"]
        if out.is_cuda:
            torch.cuda.synchronize()
        return out

    return step


def test_tiny_unet_step(benchmark, tiny_unet_step):
    out = benchmark(tiny_unet_step)
    assert out.shape == (2, 4, 8, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 640, 32, 32)])
def test_group_norm_silu_kernel(benchmark, shape):
    from diffrt.kernels import group_norm

    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    w = torch.ones(shape[1], device="cuda", dtype=torch.float16)
    b = torch.zeros_like(w)

    def run():
        y = group_norm(x, 32, w, b, 1e-5, "silu")
        torch.cuda.synchronize()
        return y

    assert benchmark(run).shape == shape


@pytest.mark.gpu
@pytest.mark.parametrize("lq, lk, d", [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80)])
def test_attention_kernel(benchmark, lq, lk, d):
    from diffrt.kernels import attention

    q = torch.randn(2, 8, lq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 8, lk, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)

    def run():
        out = attention(q, k, v)
        torch.cuda.synchronize()
        return out

    assert benchmark(run).shape == q.shape
