"""GroupNorm(+SiLU) Triton kernel against the float64 reference (CPU: Triton interpreter, small shapes)."""

import math
import sys

import pytest
import torch

pytest.importorskip("triton")

from diffrt.kernels import GroupNormAct, group_norm, group_norm_config, group_norm_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(shape, dtype, channels_last=False, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0 + offset).to(dtype)
    channels = shape[1]
    w = torch.randn(channels, generator=g)
    b = torch.randn(channels, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def _check(y, x, num_groups, w, b, eps, activation, tol):
    ref = group_norm_reference(x, num_groups, w, b, eps, activation, dtype=torch.float64)
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


# (shape, groups, channels_last, chunk_size, block_size): the chunked cases cut a group into several
# programs; chunk sizes and blocks are deliberately not multiples of each other or of the group.
CASES = [
    ((2, 12, 7, 9), 3, False, None, None),  # one program per group, one block
    ((2, 12, 7, 9), 3, True, None, None),
    ((2, 12, 7, 9), 3, False, None, 16),  # one program, 16 blocks merged (Chan), last one partial
    ((2, 12, 7, 9), 3, True, 50, None),  # 6 chunks of 50 (last 2), one block each
    ((2, 12, 7, 9), 3, False, 50, 16),  # 6 chunks, 4 blocks each
    ((1, 20, 5, 6), 4, True, 64, 16),  # 5 channels a group, channels_last, split
    ((3, 6, 1, 13), 6, False, 5, 16),  # one channel a group, 3 chunks
]


@pytest.mark.parametrize("shape,groups,channels_last,chunk,block", CASES)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_float32_matches_reference(shape, groups, channels_last, chunk, block, activation):
    x, w, b = _inputs(shape, torch.float32, channels_last)
    y = group_norm(x, groups, w, b, 1e-5, activation, chunk_size=chunk, block_size=block)
    _check(y, x, groups, w, b, 1e-5, activation, TOL[torch.float32])


@pytest.mark.parametrize("channels_last,chunk", [(False, None), (True, 40)])
def test_float16_matches_reference(channels_last, chunk):
    x, w, b = _inputs((2, 12, 7, 9), torch.float16, channels_last)
    y = group_norm(x, 3, w.half(), b.half(), 1e-6, "silu", chunk_size=chunk)
    _check(y, x, 3, w.half(), b.half(), 1e-6, "silu", TOL[torch.float16])


def test_bfloat16_with_float32_affine():
    x, w, b = _inputs((1, 8, 5, 7), torch.bfloat16)
    y = group_norm(x, 2, w, b, 1e-5, "silu")
    _check(y, x, 2, w, b, 1e-5, "silu", TOL[torch.bfloat16])


def test_no_affine():
    x, _, _ = _inputs((2, 12, 7, 9), torch.float32)
    y = group_norm(x, 4, None, None, 1e-5, None)
    _check(y, x, 4, None, None, 1e-5, None, TOL[torch.float32])


@pytest.mark.parametrize("channels_last", [False, True])
def test_three_dim_inputs(channels_last):
    g = torch.Generator().manual_seed(3)
    if channels_last:  # [N, C, L] view of [N, L, C] memory, as in diffusers' attention group norm
        x = torch.randn(2, 21, 12, generator=g).transpose(1, 2).to(DEVICE)
    else:
        x = torch.randn(2, 12, 21, generator=g).to(DEVICE)
    w = torch.randn(12, generator=g).to(DEVICE)
    y = group_norm(x, 4, w, None, 1e-6, "silu", chunk_size=30)
    _check(y, x, 4, w, None, 1e-6, "silu", TOL[torch.float32])


def test_large_mean_is_stable():
    """Mean 300, std 2: E[x^2] - E[x]^2 in float32 would lose most digits of the variance."""
    x, w, b = _inputs((1, 8, 16, 16), torch.float32, offset=300.0)
    for chunk in (None, 100):
        y = group_norm(x, 2, w, b, 1e-5, None, chunk_size=chunk, block_size=64)
        ref = group_norm_reference(x, 2, w, b, 1e-5, None, dtype=torch.float64)
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last,chunk", [(False, None), (True, None), (False, 20), (True, 20)])
def test_out_buffer_poisoned_with_nan_is_fully_written(channels_last, chunk):
    x, w, b = _inputs((2, 12, 7, 9), torch.float32, channels_last)
    out = torch.full_like(x, math.nan)
    y = group_norm(x, 3, w, b, 1e-5, "silu", out=out, chunk_size=chunk)
    assert y is out
    assert not torch.isnan(out).any()
    _check(out, x, 3, w, b, 1e-5, "silu", TOL[torch.float32])


def test_in_place():
    x, w, b = _inputs((1, 12, 7, 9), torch.float32)
    ref = group_norm_reference(x, 3, w, b, 1e-5, "silu", dtype=torch.float64)
    y = group_norm(x, 3, w, b, 1e-5, "silu", out=x, chunk_size=25)
    assert y is x
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)


def test_channels_last_in_channels_last_out():
    x, w, b = _inputs((2, 12, 7, 9), torch.float32, channels_last=True)
    assert not x.is_contiguous()
    y = group_norm(x, 3, w, b, activation="silu")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == x.stride()


def test_empty_batch():
    x = torch.empty(0, 12, 3, 3, device=DEVICE)
    assert group_norm(x, 3).shape == (0, 12, 3, 3)


# ------------------------------------------------------------------------------------------ input errors


def _x():
    return torch.randn(2, 12, 4, 4, device=DEVICE)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(num_groups=5), r"C=12 .*num_groups=5"),
        (dict(num_groups=0), r"num_groups must be a positive int"),
        (dict(weight=torch.ones(13)), r"weight has shape \(13,\); expected \(12,\)"),
        (dict(bias=torch.ones(12, 1)), r"bias has shape \(12, 1\)"),
        (dict(weight=torch.ones(12, dtype=torch.int64)), r"weight has dtype torch.int64; supported dtypes"),
        (dict(activation="gelu"), r"unknown activation 'gelu'; allowed: None, 'silu'"),
        (dict(eps=-1.0), r"eps must be >= 0"),
        (dict(out=torch.empty(2, 12, 4, 5)), r"out must match x"),
        (dict(out=torch.empty(2, 12, 4, 4).to(memory_format=torch.channels_last)), r"out has strides"),
        (dict(chunk_size=0), r"chunk_size must be a positive"),
        (dict(chunk_size=1, block_size=24), r"block_size must be a power of two"),
    ],
)
def test_argument_errors(kwargs, pattern):
    args = dict(num_groups=3)
    args.update(kwargs)
    for key in ("weight", "bias", "out"):
        if key in args:
            args[key] = args[key].to(DEVICE)
    with pytest.raises(ValueError, match=pattern):
        group_norm(_x(), **args)
    with pytest.raises(ValueError, match=pattern):  # fallback does not hide argument errors
        group_norm(_x(), **args, fallback=True)


def test_too_many_chunks():
    x = torch.randn(1, 4, 100, 100, device=DEVICE)
    with pytest.raises(ValueError, match="at most 4096"):
        group_norm(x, 1, chunk_size=1)


def test_one_dim_input_is_an_error():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        group_norm(torch.randn(12, device=DEVICE), 3)


def test_non_tensor_input():
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        group_norm([1.0, 2.0], 1)


UNSUPPORTED = {
    "dtype": (
        lambda: torch.randn(2, 12, 4, 4, dtype=torch.float64),
        r"dtype torch.float64; supported dtypes",
    ),
    "ndim": (lambda: torch.randn(2, 12, 2, 2, 2), r"5 dimensions .* the kernel takes 3-D"),
    "layout": (lambda: torch.randn(2, 12, 4, 8)[..., ::2], r"neither contiguous \(NCHW\) nor channels_last"),
    "2d": (lambda: torch.randn(4, 12), r"2 dimensions"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_inputs_raise_or_fall_back(case):
    make, pattern = UNSUPPORTED[case]
    x = make().to(DEVICE)
    w = torch.randn(12, device=DEVICE)
    with pytest.raises(ValueError, match=pattern):
        group_norm(x, 3, w, None, activation="silu")
    y = group_norm(x, 3, w, None, activation="silu", fallback=True)
    ref = group_norm_reference(x, 3, w, None, activation="silu", dtype=torch.float64)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_autograd_inputs_are_refused_unless_no_grad():
    gn = GroupNormAct(3, 12).to(DEVICE)  # parameters require grad
    x = torch.randn(2, 12, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="inference-only"):
        gn(x)
    with torch.no_grad():
        gn(x)
    gn.fallback = True
    y = gn(x)  # torch, differentiable
    assert y.requires_grad


def test_device_errors(monkeypatch):
    meta = torch.empty(2, 12, 4, 4, device="meta")
    with pytest.raises(ValueError, match="device meta"):
        group_norm(meta, 3)
    w = torch.ones(12, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but x is on"):
        group_norm(torch.randn(2, 12, 4, 4), 3, w)
    if DEVICE == "cpu":
        # CPU tensors without the interpreter: a clear error, or torch when asked.
        monkeypatch.setattr(sys.modules["diffrt.kernels.launch"], "interpreter_active", lambda kernel: False)
        x = torch.randn(2, 12, 4, 4)
        with pytest.raises(ValueError, match="Triton interpreter is off"):
            group_norm(x, 3)
        y = group_norm(x, 3, fallback=True)
        torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 3))


# ------------------------------------------------------------------------------------------ module, config


def test_group_norm_act_module_shares_parameters():
    gn = torch.nn.GroupNorm(3, 12, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    fused = GroupNormAct.from_group_norm(gn, activation="silu")
    assert fused.weight is gn.weight and fused.bias is gn.bias
    assert list(fused.state_dict()) == list(gn.state_dict())
    x = torch.randn(2, 12, 7, 9, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.nn.functional.silu(gn(x)), rtol=1e-5, atol=1e-5)
    plain = GroupNormAct(4, 12, eps=1e-5, affine=False).to(DEVICE)
    assert plain.weight is None
    torch.testing.assert_close(plain(x), torch.nn.functional.group_norm(x, 4), rtol=1e-5, atol=1e-5)
    assert "activation='silu'" in repr(fused)
    with pytest.raises(ValueError, match="unknown activation"):
        GroupNormAct(3, 12, activation="relu")
    with pytest.raises(ValueError, match="not divisible"):
        GroupNormAct(5, 12)
    with pytest.raises(ValueError, match="needs an nn.GroupNorm"):
        GroupNormAct.from_group_norm(torch.nn.LayerNorm(4))


@pytest.mark.parametrize(
    "shape",
    [
        (2, 320, 64, 64),  # SD1.5 U-Net, 512 px
        (2, 1280, 8, 8),
        (2, 320, 128, 128),  # SDXL U-Net, 1024 px
        (1, 512, 64, 64),  # VAE decoder input, 512 px
        (1, 128, 512, 512),  # VAE decoder output stage, 512 px
        (1, 128, 1024, 1024),  # VAE decoder output stage, 1024 px: 4M elements a group
    ],
)
def test_gpu_config_heuristic(monkeypatch, shape):
    """The split heuristic covers every element once, with aligned chunks and bounded program counts."""
    gn_module = sys.modules["diffrt.kernels.group_norm"]
    monkeypatch.setattr(gn_module, "sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    n, c = shape[:2]
    group = (c // 32) * shape[2] * shape[3]
    cfg = group_norm_config(n * 32, group, interpret=False)
    assert cfg.block & (cfg.block - 1) == 0 and 16 <= cfg.block <= 2048
    assert (cfg.num_chunks - 1) * cfg.chunk < group <= cfg.num_chunks * cfg.chunk
    assert cfg.num_chunks <= 256
    if cfg.num_chunks > 1:
        assert cfg.chunk % cfg.block == 0 and cfg.chunk >= 8192
    if group >= 1 << 20:
        assert cfg.num_chunks >= 16  # the 1024-px VAE groups are spread over many programs
