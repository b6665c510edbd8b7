"""RMSNorm of attention queries and keys fused with FLUX's rotary position embedding, written straight into
the joint (text + image) sequence, as one Triton kernel (inference).

FLUX.1 (and SD3.5) normalize each head's query and key with RMSNorm (a learned weight over the head dim);
FLUX then rotates interleaved pairs ``(x[2i], x[2i+1])`` by the position's angles, and the double-stream
blocks concatenate the text and image tokens before attention. Eager diffusers launches 15 elementwise
kernels over q (and as many over k): 6 in its RMSNorm, 1 for the concatenation, 8 in ``apply_rotary_emb``.
:func:`rms_norm_rope` reads the projection's output once and writes the normalized, rotated rows into their
place in the joint buffer: one pass. With ``rope=None``
it is RMSNorm alone (SD3.5), and with ``weight=None`` and ``norm=False`` a copy into the joint buffer (SD3).

The rotation, with ``cos``/``sin`` the position's ``[D]`` rows as diffusers' ``FluxPosEmbed`` makes them
(each angle repeated for its pair)::

    out[2i]   = x[2i]   * cos[2i]   - x[2i+1] * sin[2i]
    out[2i+1] = x[2i+1] * cos[2i+1] + x[2i]   * sin[2i+1]

One program handles one token: all its heads, ``[H, D]`` in registers, float32 throughout (the RMS over each
head's ``D`` values), rounded once to the output's dtype. Inputs are ``[B, L, H, D]`` with a contiguous head
dim (diffusers' ``unflatten`` of a Linear's output, read through its strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autograd_problem, device_problem, dtype_problem, interpreter_active, next_power_of_2

MAX_TILE = 16384  # heads x padded head dim held in registers by one program


@triton.jit
def rms_rope_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    o_ptr,
    L,
    H,
    D,
    offset,
    stride_xb,
    stride_xl,
    stride_xh,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_cos,
    eps,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (B * L,): token l of sample b -> row ``offset + l`` of the output (and of cos/sin)."""
    row = tl.program_id(0)
    b = (row // L).to(tl.int64)
    l_ = (row % L).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < D)
    x_row = x_ptr + b * stride_xb + l_ * stride_xl + h * stride_xh
    x = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        x = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        x = x * w
    if ROPE:
        pair = d ^ 1  # the other element of the rotated pair
        partner = tl.load(x_row + pair, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            partner = partner * rstd[:, None]
        if HAS_WEIGHT:
            partner = partner * tl.load(w_ptr + pair, mask=d < D, other=0.0).to(tl.float32)
        position = (offset + l_) * stride_cos
        cos = tl.load(cos_ptr + position + d, mask=d < D, other=0.0)
        sin = tl.load(sin_ptr + position + d, mask=d < D, other=0.0)
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
        x = x * cos + sign * partner * sin
    out = o_ptr + b * stride_ob + (offset + l_) * stride_ol + h * stride_oh + d
    tl.store(out, x.to(o_ptr.dtype.element_ty), mask=mask)


def _check(x, weight, rope, out, offset, norm):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D [batch, tokens, heads, head_dim] tensor, got {shape}")
    batch, tokens, heads, head_dim = x.shape
    if weight is not None and (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (head_dim,)):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a ({head_dim},) tensor (the head dim of x {tuple(x.shape)}), got {shape}")
    if weight is not None and not norm:
        raise ValueError("weight applies to the RMSNorm: give norm=True, or no weight")
    if rope is not None:
        if not (isinstance(rope, tuple | list) and len(rope) == 2):
            raise ValueError("rope must be a (cos, sin) pair of [positions, head_dim] tensors")
        for name, t in zip(("cos", "sin"), rope, strict=True):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != head_dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"rope {name} must be [positions, {head_dim}], got {shape}")
        if head_dim % 2:
            raise ValueError(f"rotary embeddings rotate pairs: the head dim must be even, got {head_dim}")
    rows = offset + tokens
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != batch or out.shape[2:] != x.shape[2:]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be [{batch}, tokens, {heads}, {head_dim}] like x, got {shape}")
        if out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must have x's dtype and device ({x.dtype} on {x.device}), got {out.dtype} "
                             f"on {out.device}")  # fmt: skip
        if not 0 <= offset or rows > out.shape[1]:
            raise ValueError(f"rows {offset}..{rows} do not fit in out's {out.shape[1]} tokens")
    elif offset != 0:
        raise ValueError("offset places x's rows in out: give out= too")
    if rope is not None and rope[0].shape[0] < rows:
        raise ValueError(f"rope covers {rope[0].shape[0]} positions but rows up to {rows} are written")


def _kernel_problem(x, out) -> str | None:
    problem = autograd_problem(x) or dtype_problem(x, "x") or device_problem(x, "x", rms_rope_kernel)
    if problem:
        return problem
    if x.stride(-1) != 1 or (out is not None and out.stride(-1) != 1):
        return f"x (strides {x.stride()}) and out need a contiguous head dim"
    if next_power_of_2(x.shape[2]) * max(16, next_power_of_2(x.shape[3])) > MAX_TILE:
        return f"{x.shape[2]} heads of {x.shape[3]} exceed one program's {MAX_TILE}-element tile"
    return None


def rms_norm_rope(x, weight=None, eps: float = 1e-6, rope=None, *, norm: bool = True, out=None, offset: int = 0,
                  fallback: bool = False) -> torch.Tensor:  # fmt: skip
    """RMSNorm over the head dim (times ``weight`` when given) then, with ``rope=(cos, sin)``, FLUX's rotation
    of interleaved pairs, written to ``out[:, offset:offset + L]`` (a new ``[B, L, H, D]`` tensor without ``out``).

    Args:
        x: ``[B, L, H, D]`` with a contiguous head dim; float32/float16/bfloat16 on CUDA (or the CPU under
            the Triton interpreter).
        weight: ``[D]`` RMSNorm weight, or None. norm: False skips the RMSNorm (a rotation or a copy).
        rope: ``(cos, sin)``, each ``[positions, D]``; row ``offset + l`` rotates token ``l``.
        out: ``[B, L_total, H, D]`` of x's dtype (a joint sequence); offset: where x's tokens go in it.
        fallback: compute with torch when the kernel cannot take the inputs instead of raising.
    """
    _check(x, weight, rope, out, offset, norm)
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    problem = _kernel_problem(x, out)
    if problem is not None:
        if not fallback:
            raise ValueError(problem + " (pass fallback=True to use torch instead)")
        y = rms_rope_reference(x, weight, eps, rope, norm=norm, offset=offset, dtype=torch.float32).to(x.dtype)
        if out is None:
            return y
        out[:, offset : offset + x.shape[1]] = y
        return out
    batch, tokens, heads, head_dim = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    cos, sin = (t.to(device=x.device, dtype=torch.float32).contiguous() for t in rope) if rope is not None else (x, x)
    interpret = interpreter_active(rms_rope_kernel)
    block_h, block_d = next_power_of_2(heads), max(16, next_power_of_2(head_dim))
    rms_rope_kernel[(batch * tokens,)](
        x, weight if weight is not None else x, cos, sin, out, tokens, heads, head_dim, offset,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), cos.stride(0),
        float(eps), NORM=norm, HAS_WEIGHT=weight is not None, ROPE=rope is not None, BLOCK_H=block_h,
        BLOCK_D=block_d, num_warps=1 if interpret else max(1, min(8, block_h * block_d // 512)),
    )  # fmt: skip
    return out


def rms_rope_reference(x, weight=None, eps: float = 1e-6, rope=None, *, norm: bool = True, offset: int = 0,
                       dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Float64 RMSNorm (+ weight) and rotation of ``x`` ``[B, L, H, D]``; returned in ``dtype`` (default x's)."""
    y = x.detach().double()
    if norm:
        y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.detach().double()
    if rope is not None:
        rows = slice(offset, offset + x.shape[1])
        cos, sin = (t.detach().double()[rows][None, :, None, :] for t in rope)
        pairs = y.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        y = y * cos + rotated * sin
    return y.to(dtype or x.dtype)


__all__ = ["rms_norm_rope", "rms_rope_reference"]
