"""LayerNorm with adaLN modulation and gated residual adds, as one Triton kernel (inference), for the
transformer blocks of SD3 and FLUX.1.

A DiT block spends its elementwise time around its attention and MLP on the same few steps over
``[batch, tokens, width]`` activations, each a full read and write in eager PyTorch:

* adaLN: ``LayerNorm(x) * (1 + scale[b]) + shift[b]`` (LayerNorm without affine, per-sample ``shift`` and
  ``scale`` rows of the conditioning embedding): eager reads and writes the activations three times (norm,
  multiply, add); :func:`adaln_modulate` once.
* the gated residual after attention and the modulated norm before the MLP:
  ``r = x + gate[b] * y`` then ``LayerNorm(r) * (1 + scale[b]) + shift[b]``: eager makes five passes (gate
  product, add, norm, multiply, add), :func:`gated_residual_adaln` one (reading ``x`` and ``y``, writing ``r``
  and the normed output).
* the gated residual at the end of a block, ``x + gate[b] * y`` (and FLUX's float16 clip to +-65504): eager
  two passes (three with the clip), :func:`gated_residual` one.

One program normalizes one token row (``D`` wide, ``D`` <= 16384) in registers: float32 statistics (the row's
mean, then the mean of squared deviations: no ``E[x^2] - E[x]^2``), the result rounded once to the input's
dtype. Rows are addressed through their strides (``x[b, l, :]`` must be contiguous); ``shift``, ``scale`` and
``gate`` are ``[B, D]`` views such as the chunks of diffusers' modulation embedding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autograd_problem, device_problem, dtype_problem, interpreter_active, next_power_of_2

MAX_WIDTH = 16384
FP16_MAX = 65504.0
_FP16_MAX = tl.constexpr(FP16_MAX)  # the kernel reads globals only as constexpr


@triton.jit
def adaln_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    shift_ptr,
    scale_ptr,
    res_ptr,
    out_ptr,
    L,
    D,
    stride_xb,
    stride_xl,
    stride_yb,
    stride_yl,
    stride_rb,
    stride_rl,
    stride_ob,
    stride_ol,
    stride_gate,
    stride_shift,
    stride_scale,
    eps,
    GATED: tl.constexpr,
    NORM: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (B * L,). GATED: r = x + gate * y (stored to res); NORM: LayerNorm(r or x) modulated (to out)."""
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l_ = (row % L).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    x = tl.load(x_ptr + b * stride_xb + l_ * stride_xl + d, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        y = tl.load(y_ptr + b * stride_yb + l_ * stride_yl + d, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + b * stride_gate + d, mask=mask, other=0.0).to(tl.float32)
        x = x + g * y
        if CLIP:
            x = tl.minimum(tl.maximum(x, -_FP16_MAX), _FP16_MAX)
        tl.store(res_ptr + b * stride_rb + l_ * stride_rl + d, x.to(res_ptr.dtype.element_ty), mask=mask)
    if NORM:
        mean = tl.sum(x, axis=0) / D
        centered = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
        shift = tl.load(shift_ptr + b * stride_shift + d, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * stride_scale + d, mask=mask, other=0.0).to(tl.float32)
        out = centered * rstd * (1.0 + scale) + shift
        tl.store(out_ptr + b * stride_ob + l_ * stride_ol + d, out.to(out_ptr.dtype.element_ty), mask=mask)


def adaln_warps(width: int, interpret: bool) -> int:
    """Warps per row: about 16 bytes of float16 (8 elements) per thread, 1 to 16 warps."""
    return 1 if interpret else max(1, min(16, next_power_of_2(width) // 256))


# --------------------------------------------------------------------------------------------- launchers
def _check_rows(name: str, t, like=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 3:
        raise ValueError(f"{name} must be 3-D [batch, tokens, width], got shape {tuple(t.shape)}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"{name} must match x: {name} is {tuple(t.shape)} {t.dtype} on {t.device}, x is "
                         f"{tuple(like.shape)} {like.dtype} on {like.device}")  # fmt: skip


def _check_vectors(x: torch.Tensor, **vectors) -> None:
    batch, _, width = x.shape
    for name, t in vectors.items():
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, width):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [batch, width] = ({batch}, {width}) tensor for x {tuple(x.shape)}, "
                             f"got {shape}")  # fmt: skip
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        problem = dtype_problem(t, name)
        if problem:
            raise ValueError(problem)


def _kernel_problem(x: torch.Tensor, *others) -> str | None:
    problem = autograd_problem(x, *others) or dtype_problem(x, "x") or device_problem(x, "x", adaln_kernel)
    if problem:
        return problem
    if x.shape[-1] > MAX_WIDTH:
        return f"width {x.shape[-1]} exceeds the kernel's {MAX_WIDTH} (one row is normalized in registers)"
    for t in (x, *others):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return f"a tensor of shape {tuple(t.shape)} has strides {t.stride()}: its last dim must be contiguous"
    return None


def _torch_math(x, y, gate, shift, scale, eps, clip):
    """The same computation in torch (float32), for ``fallback=True``."""
    r = x.float()
    if y is not None:
        r = r + gate.float()[:, None] * y.float()
        if clip:
            r = r.clamp(-FP16_MAX, FP16_MAX)
    normed = None
    if shift is not None:
        normed = torch.nn.functional.layer_norm(r, r.shape[-1:], eps=eps)
        normed = (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)
    return r.to(x.dtype), normed


def _launch(x, y, gate, shift, scale, eps, clip, fallback):
    gated, norm = y is not None, shift is not None
    problem = _kernel_problem(x, *(t for t in (y, gate, shift, scale) if t is not None))
    if problem is not None:
        if fallback:
            return _torch_math(x, y, gate, shift, scale, eps, clip)
        raise ValueError(problem + " (pass fallback=True to use torch instead)")
    batch, tokens, width = x.shape
    res = torch.empty_like(x, memory_format=torch.contiguous_format) if gated else x
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if norm else x
    if x.numel() == 0:
        return res, out
    y_, gate_ = (y, gate) if gated else (x, x[:, 0])  # dummies: never read with GATED off
    shift_, scale_ = (shift, scale) if norm else (x[:, 0], x[:, 0])
    interpret = interpreter_active(adaln_kernel)
    adaln_kernel[(batch * tokens,)](
        x, y_, gate_, shift_, scale_, res, out, tokens, width,
        x.stride(0), x.stride(1), y_.stride(0), y_.stride(1), res.stride(0), res.stride(1),
        out.stride(0), out.stride(1), gate_.stride(0), shift_.stride(0), scale_.stride(0), float(eps),
        GATED=gated, NORM=norm, CLIP=bool(clip), BLOCK_D=max(16, next_power_of_2(width)),
        num_warps=adaln_warps(width, interpret),
    )  # fmt: skip
    return res, out


def _check_eps(eps) -> None:
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def adaln_modulate(x, shift, scale, eps: float = 1e-6, *, fallback: bool = False) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (LayerNorm without affine, over the last dim).

    Args:
        x: ``[B, L, D]`` float32/float16/bfloat16 with contiguous rows, on CUDA (or the CPU under the
            Triton interpreter); shift, scale: ``[B, D]``.
        fallback: compute with torch when the kernel cannot take the inputs (device, autograd, ...) instead of
            raising. Invalid arguments raise either way.
    Returns a new contiguous tensor of ``x``'s dtype.
    """
    _check_rows("x", x)
    _check_vectors(x, shift=shift, scale=scale)
    _check_eps(eps)
    return _launch(x, None, None, shift, scale, eps, False, fallback)[1]


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6, *, clip: bool = False,
                         fallback: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``r = x + gate[:, None] * y`` and ``LayerNorm(r) * (1 + scale[:, None]) + shift[:, None]`` in one pass:
    returns ``(r, normed)``. ``clip`` clamps ``r`` to float16's range (FLUX does for float16)."""
    _check_rows("x", x)
    _check_rows("y", y, like=x)
    _check_vectors(x, gate=gate, shift=shift, scale=scale)
    _check_eps(eps)
    return _launch(x, y, gate, shift, scale, eps, clip, fallback)


def gated_residual(x, y, gate, *, clip: bool = False, fallback: bool = False) -> torch.Tensor:
    """``x + gate[:, None] * y`` in one pass (``clip``: clamped to float16's range, as FLUX does)."""
    _check_rows("x", x)
    _check_rows("y", y, like=x)
    _check_vectors(x, gate=gate)
    return _launch(x, y, gate, None, None, 1e-6, clip, fallback)[0]


def adaln_reference(x, shift=None, scale=None, eps: float = 1e-6, *, y=None, gate=None, clip: bool = False,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Float64 ``(r, normed)``: ``r = x (+ gate * y, clamped with clip)``, ``normed`` its modulated LayerNorm
    (None without shift/scale); returned in ``dtype`` (default ``x.dtype``)."""
    r = x.detach().double()
    if y is not None:
        r = r + gate.detach().double()[:, None] * y.detach().double()
        if clip:
            r = r.clamp(-FP16_MAX, FP16_MAX)
    normed = None
    if shift is not None:
        mean = r.mean(-1, keepdim=True)
        var = (r - mean).square().mean(-1, keepdim=True)
        normed = (r - mean) / torch.sqrt(var + eps) * (1 + scale.detach().double()[:, None])
        normed = (normed + shift.detach().double()[:, None]).to(dtype or x.dtype)
    return r.to(dtype or x.dtype), normed


__all__ = ["MAX_WIDTH", "adaln_modulate", "adaln_reference", "gated_residual", "gated_residual_adaln"]
