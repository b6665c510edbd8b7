"""FlashAttention-style Triton kernel against the float64 reference (CPU: interpreter, small shapes)."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from diffrt.kernels import TritonAttnProcessor, attention, attention_config, attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _qkv(batch, heads, seq_q, seq_k, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as diffusers makes it: a [B, L, H, D] buffer viewed as [B, H, L, D] (no copy).
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    # k and v as slices of one packed [B, L, 2, H, D] buffer.
    kv = torch.randn(batch, seq_k, 2, heads, head_dim, generator=g).to(dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _check(out, q, k, v, tol, scale=None):
    ref = attention_reference(q, k, v, scale=scale, dtype=torch.float64)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


# (batch, heads, seq_q, seq_k, head_dim, block_m, block_n): lengths not multiples of the blocks,
# padded head dims 40 -> 64, 80 -> 128, 160 -> 256, cross attention with 77 keys.
CASES = [
    (1, 2, 37, 29, 40, 16, 16),
    (2, 2, 50, 77, 80, None, None),
    (1, 1, 20, 33, 160, 16, 16),
    (2, 1, 16, 16, 64, None, None),
    (1, 2, 70, 9, 8, 32, 16),
]


@pytest.mark.parametrize("batch,heads,seq_q,seq_k,head_dim,bm,bn", CASES)
def test_float32_matches_reference(batch, heads, seq_q, seq_k, head_dim, bm, bn):
    q, k, v = _qkv(batch, heads, seq_q, seq_k, head_dim, torch.float32)
    out = attention(q, k, v, block_m=bm, block_n=bn)
    _check(out, q, k, v, TOL[torch.float32])


@pytest.mark.parametrize("head_dim", [40, 80])
def test_float16_matches_reference(head_dim):
    q, k, v = _qkv(2, 2, 45, 23, head_dim, torch.float16)
    out = attention(q, k, v, block_m=16, block_n=16)
    _check(out, q, k, v, TOL[torch.float16])


def test_bfloat16_matches_reference():
    q, k, v = _qkv(1, 2, 33, 20, 40, torch.bfloat16)
    _check(attention(q, k, v, block_m=16, block_n=16), q, k, v, TOL[torch.bfloat16])


def test_custom_scale_and_non_unit_head_stride():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 40, 30, generator=g).transpose(-1, -2).to(DEVICE)  # head-dim stride 30
    k = torch.randn(1, 2, 19, 40, generator=g).to(DEVICE)
    v = torch.randn(1, 2, 19, 40, generator=g).to(DEVICE)
    assert q.stride(-1) != 1
    out = attention(q, k, v, scale=0.3, block_m=16, block_n=16)
    _check(out, q, k, v, TOL[torch.float32], scale=0.3)


def test_large_logits_stay_finite():
    """Scores around +-200: the online softmax must subtract the running max."""
    q, k, v = _qkv(1, 1, 24, 40, 64, torch.float32)
    out = attention(q * 20, k * 5, v, block_m=16, block_n=16)
    _check(out, q * 20, k * 5, v, 1e-4)


def test_out_buffer_poisoned_with_nan_is_fully_written():
    q, k, v = _qkv(2, 2, 37, 29, 40, torch.float32)
    out = torch.full(q.shape, math.nan, device=DEVICE)
    res = attention(q, k, v, out=out, block_m=16, block_n=16)
    assert res is out
    assert not torch.isnan(out).any()
    _check(out, q, k, v, TOL[torch.float32])


def test_default_output_layout_makes_the_processor_reshape_free():
    q, k, v = _qkv(2, 3, 10, 10, 16, torch.float32)
    out = attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


# ------------------------------------------------------------------------------------------ input errors


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: (_t(2, 8, 16), _t(2, 8, 16), _t(2, 8, 16)), r"q must be 4-D"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16, dtype=torch.float16), _t(1, 2, 8, 16)), r"share a dtype"),
        (lambda: (_t(1, 2, 8, 16), _t(2, 2, 8, 16), _t(2, 2, 8, 16)), r"batch sizes differ: q 1, k 2"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 3, 8, 16), _t(1, 3, 8, 16)), r"head counts differ"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 32), _t(1, 2, 8, 32)), r"head dims differ: q 16, k 32"),
        (lambda: (_t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 9, 16)), r"sequence lengths differ: 8 vs 9"),
        (lambda: ([1.0], _t(1, 2, 8, 16), _t(1, 2, 8, 16)), r"q must be a torch.Tensor"),
    ],
)
def test_argument_errors(make, pattern):
    q, k, v = make()
    with pytest.raises(ValueError, match=pattern):
        attention(q, k, v)
    with pytest.raises(ValueError, match=pattern):
        attention(q, k, v, fallback=True)


def test_bad_scale_out_and_blocks():
    q = _t(1, 2, 8, 16)
    with pytest.raises(ValueError, match="scale must be a finite float"):
        attention(q, q, q, scale=float("nan"))
    with pytest.raises(ValueError, match="out must have q's shape"):
        attention(q, q, q, out=_t(1, 2, 8, 17))
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        attention(q, q, q, block_m=24)


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: _t(1, 2, 8, 16, dtype=torch.float64), r"dtype torch.float64; supported dtypes are"),
        (
            lambda: _t(1, 1, 8, 300),
            r"head_dim 300 is not supported: supported head dims are 1..256 .*40, 64, 80",
        ),
    ],
)
def test_unsupported_inputs_raise_or_fall_back(make, pattern):
    q = make()
    k, v = q[:, :, :5] * 0.5, q[:, :, :5].flip(-1)
    with pytest.raises(ValueError, match=pattern):
        attention(q, k, v)
    out = attention(q, k, v, fallback=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_autograd_inputs_are_refused_unless_no_grad():
    q = _t(1, 2, 8, 16).requires_grad_()
    with pytest.raises(ValueError, match="inference-only"):
        attention(q, q, q)
    with torch.no_grad():
        attention(q, q, q)
    assert attention(q, q, q, fallback=True).requires_grad


def test_device_errors(monkeypatch):
    q = torch.empty(1, 2, 8, 16, device="meta")
    with pytest.raises(ValueError, match="device meta"):
        attention(q, q, q)
    with pytest.raises(ValueError, match="one device"):
        attention(_t(1, 2, 8, 16), q, q)
    if DEVICE == "cpu":
        monkeypatch.setattr(sys.modules["diffrt.kernels.launch"], "interpreter_active", lambda kernel: False)
        x = _t(1, 2, 8, 16)
        with pytest.raises(ValueError, match="Triton interpreter is off"):
            attention(x, x, x)
        torch.testing.assert_close(attention(x, x, x, fallback=True), F.scaled_dot_product_attention(x, x, x))


@pytest.mark.parametrize(
    "seq_q,seq_k,head_dim,block_d",
    [(4096, 4096, 40, 64), (4096, 77, 40, 64), (1024, 77, 80, 128), (256, 256, 160, 256), (64, 77, 160, 256)],
)
def test_gpu_config(seq_q, seq_k, head_dim, block_d):
    cfg = attention_config(seq_q, seq_k, head_dim, torch.float16, interpret=False)
    assert cfg.block_d == block_d
    assert cfg.block_m >= 16 and cfg.block_n >= 16  # tl.dot needs every dim >= 16
    assert cfg.block_n <= max(16, 1 << (seq_k - 1).bit_length())
    assert cfg.block_m * cfg.block_d <= 128 * 128  # accumulator fits the registers


# ------------------------------------------------------------------------------------------ diffusers


def _attention_module(**kwargs):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(**kwargs).to(DEVICE).eval()
    attn.set_processor(AttnProcessor2_0())
    return attn


def _compare(attn, *args, **kwargs):
    from diffusers.models.attention_processor import AttnProcessor2_0

    processor = TritonAttnProcessor()
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(*args, **kwargs)
        attn.set_processor(processor)
        out = attn(*args, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    return processor.calls


def test_processor_cross_attention_matches_sdpa():
    attn = _attention_module(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16)
    hidden = torch.randn(2, 20, 32, device=DEVICE)
    context = torch.randn(2, 7, 24, device=DEVICE)
    calls = _compare(attn, hidden, encoder_hidden_states=context)
    assert calls == {"triton": 1, "sdpa_mask": 0, "sdpa_fallback": 0}


def test_processor_vae_style_self_attention_matches_sdpa():
    """4-D input, group norm inside the attention, residual connection and rescale (the VAE mid block)."""
    attn = _attention_module(
        query_dim=16, heads=1, dim_head=16, norm_num_groups=4, residual_connection=True,
        rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True,
    )  # fmt: skip
    hidden = torch.randn(1, 16, 5, 6, device=DEVICE)
    calls = _compare(attn, hidden)
    assert calls["triton"] == 1


def test_processor_falls_back_to_sdpa_for_masks():
    attn = _attention_module(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16)
    hidden = torch.randn(2, 12, 32, device=DEVICE)
    context = torch.randn(2, 7, 24, device=DEVICE)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    mask[0, 5:] = False
    calls = _compare(attn, hidden, encoder_hidden_states=context, attention_mask=mask)
    assert calls == {"triton": 0, "sdpa_mask": 1, "sdpa_fallback": 0}


def test_processor_unsupported_head_dim():
    attn = _attention_module(query_dim=300, heads=1, dim_head=300)
    hidden = torch.randn(1, 6, 300, device=DEVICE)
    attn.set_processor(TritonAttnProcessor())
    with torch.no_grad(), pytest.raises(ValueError, match="head_dim 300 is not supported"):
        attn(hidden)
    processor = TritonAttnProcessor(fallback=True)
    attn.set_processor(processor)
    with torch.no_grad():
        attn(hidden)
    assert processor.calls["sdpa_fallback"] == 1
