"""FlashAttention-style forward attention as a Triton kernel (inference), plus a diffusers processor.

``attention(q, k, v)`` computes ``softmax(q k^T * scale) v`` for ``[batch, heads, seq, head_dim]`` tensors
like ``torch.nn.functional.scaled_dot_product_attention`` (no mask, no dropout, not causal).  One program
handles ``BLOCK_M`` query rows of one (batch, head) and streams the keys/values in blocks of ``BLOCK_N``
with the online softmax (running max ``m``, running sum ``l``, rescaled accumulator), in base 2 with
``log2(e)`` folded into the scale, so no ``seq_q x seq_k`` matrix is ever stored.  The head dimension is
padded to the next power of two (at least 16, for ``tl.dot``) with masked loads, so 40, 80 and 160 (SD1.x)
run in 64-, 128- and 256-wide tiles.  Inputs are read through their strides (the transposed views that
diffusers makes cost no copy); the output is a ``[B, H, Lq, D]`` view of a ``[B, Lq, H, D]`` buffer, so
the processor's ``transpose(1, 2).reshape(B, Lq, H * D)`` is free.

Precision: float16/bfloat16 operands go to the tensor cores with float32 accumulation; float32 operands use
``input_precision="ieee"`` (true fp32, no tf32; slow on GPU, meant for checks).  Under the Triton
interpreter every operand is cast to float32 first (the interpreter multiplies bf16 ``tl.dot`` operands
wrongly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import (
    autograd_problem,
    cdiv,
    device_problem,
    dtype_problem,
    interpreter_active,
    next_power_of_2,
)

MIN_HEAD_DIM = 1
MAX_HEAD_DIM = 256
SD_HEAD_DIMS = (40, 64, 80, 128, 160)
_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535


@triton.jit
def attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    H,
    SEQ_Q,
    SEQ_K,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (cdiv(SEQ_Q, BLOCK_M), B * H).  ``qk_scale`` = softmax scale * log2(e)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < SEQ_Q

    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, SEQ_K, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < SEQ_K
        # K^T tile [BLOCK_D, BLOCK_N] straight from memory (no transpose op).
        k = tl.load(
            k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn,
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = qk * qk_scale
        if not EVEN_N:
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None]
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        acc.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def attention_config(
    seq_q: int,
    seq_k: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    interpret: bool,
    block_m: int | None = None,
    block_n: int | None = None,
) -> AttentionConfig:
    """Tile sizes from the head dim and sequence lengths (no autotune: the interpreter cannot run it).

    Chosen by compiling for sm_90 ahead of time (``triton.compile`` + ``cuobjdump --dump-resource-usage``)
    and keeping register spills at zero where possible; not tuned on a GPU.  16-bit operands (wgmma):
    padded head dim <= 128: 128 x 64 tiles, 8 warps, 3 stages (4 warps spill at head dim 64);
    256 (head dim 160): 64 x 32, 8 warps, 2 stages (the 64 x 256 fp32 accumulator still spills ~80 bytes
    a thread; every larger tile spills more).  float32 operands (``ieee`` FMA dot, a correctness path):
    32 x 32 (<= 64), 32 x 16 (128), 16 x 16 (256), 4 warps, 1 stage, no spills.  Tiles never exceed the
    next power of two of the sequence lengths (short cross-attention keys, e.g. 77 -> 64-wide tiles, two
    iterations).  Interpreter: 64 x 64 tiles (overridable for tests).
    """
    block_d = max(16, next_power_of_2(head_dim))
    if interpret:
        bm, bn, warps, stages = 64, 64, 1, 1
    elif dtype == torch.float32:
        bm, bn = {64: (32, 32), 128: (32, 16), 256: (16, 16)}[max(64, block_d)]
        warps, stages = 4, 1
    elif block_d <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    bm = min(bm, max(16, next_power_of_2(seq_q)))
    bn = min(bn, max(16, next_power_of_2(seq_k)))
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return AttentionConfig(
        block_m=block_m or bm, block_n=block_n or bn, block_d=block_d, num_warps=warps, num_stages=stages
    )


def _check_params(q, k, v, scale, out):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    (bq, hq, _, dq), (bk, hk, lk, dk), (bv, hv, lv, dv) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise ValueError(f"batch sizes differ: q {bq}, k {bk}, v {bv}")
    if not (hq == hk == hv):
        raise ValueError(
            f"head counts differ: q {hq}, k {hk}, v {hv} (grouped-query attention is not supported)"
        )
    if not (dq == dk == dv):
        raise ValueError(f"head dims differ: q {dq}, k {dk}, v {dv}; they must be equal")
    if lk != lv:
        raise ValueError(f"k and v sequence lengths differ: {lk} vs {lv}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a tensor or None, got {type(out).__name__}")
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must have q's shape, dtype and device: out is {tuple(out.shape)} {out.dtype} on "
                f"{out.device}, q is {tuple(q.shape)} {q.dtype} on {q.device}"
            )


def _kernel_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> str | None:
    problem = autograd_problem(q, k, v) or dtype_problem(q, "q") or device_problem(q, "q", attn_fwd_kernel)
    if problem:
        return problem
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        sd = ", ".join(str(x) for x in SD_HEAD_DIMS)
        return (
            f"head_dim {d} is not supported: supported head dims are {MIN_HEAD_DIM}..{MAX_HEAD_DIM} "
            f"(padded inside the kernel to the next power of two >= 16; Stable Diffusion uses {sd})"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        return f"empty sequence: q has {q.shape[2]} and k has {k.shape[2]} positions"
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        return f"batch * heads = {q.shape[0] * q.shape[1]} exceeds the kernel's grid limit {_MAX_GRID_Y}"
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    fallback: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``softmax(q @ k^T * scale) @ v`` for ``[batch, heads, seq, head_dim]`` tensors (SDPA semantics).

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]``; any strides; float16/bfloat16/float32 on CUDA
            (or CPU under the Triton interpreter).  D in 1..256 (SD: 40, 64, 80, 128, 160).
        scale: softmax scale, default ``1 / sqrt(D)``.
        out: optional ``[B, H, Lq, D]`` output buffer of q's dtype (any strides).
        fallback: when the kernel cannot take the inputs (device, dtype, head dim, autograd), use
            ``torch.nn.functional.scaled_dot_product_attention`` instead of raising.  Inconsistent
            arguments raise either way.
        block_m, block_n: tile overrides (powers of two >= 16), for tests.

    Returns the output, by default a ``[B, H, Lq, D]`` view of a ``[B, Lq, H, D]``-contiguous buffer.
    """
    _check_params(q, k, v, scale, out)
    problem = _kernel_problem(q, k, v)
    if problem is not None:
        if not fallback:
            raise ValueError(problem + " (pass fallback=True to use torch SDPA instead)")
        y = F.scaled_dot_product_attention(q, k, v, scale=scale)
        if out is not None:
            out.copy_(y)
            return out
        return y
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if out is None:
        out = torch.empty((batch, seq_q, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
    softmax_scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    interpret = interpreter_active(attn_fwd_kernel)
    cfg = attention_config(
        seq_q, seq_k, head_dim, q.dtype, interpret=interpret, block_m=block_m, block_n=block_n
    )
    grid = (cdiv(seq_q, cfg.block_m), batch * heads)
    attn_fwd_kernel[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, seq_q, seq_k, softmax_scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        EVEN_N=seq_k % cfg.block_n == 0, UPCAST=interpret or q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Float64 ``softmax(q k^T * scale) v``; returns ``dtype`` (default: q's dtype)."""
    qd, kd, vd = (t.detach().to(torch.float64) for t in (q, k, v))
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    weights = torch.softmax(qd @ kd.transpose(-1, -2) * s, dim=-1)
    return (weights @ vd).to(dtype or q.dtype)


class TritonAttnProcessor:
    """Drop-in for diffusers' ``AttnProcessor2_0`` (diffusers 0.42) that calls :func:`attention`.

    Same call signature and the same steps (spatial norm, 4-D to tokens, group norm, projections, q/k norms,
    output projection, dropout, residual, rescale).  Like ``AttnProcessor2_0`` the softmax scale is SDPA's
    default ``1 / sqrt(head_dim)``, not ``attn.scale``.  Differences, both documented fallbacks to
    ``F.scaled_dot_product_attention``:

    * an ``attention_mask`` is given (the kernel has no mask support) -- always;
    * the kernel cannot take the inputs (e.g. head dim > 256 such as the SD VAE's 512, or a CPU tensor
      without the interpreter) -- only when ``fallback=True``; otherwise the ValueError propagates.

    ``calls`` counts how each call was served: ``{"triton": n, "sdpa_mask": n, "sdpa_fallback": n}``.
    """

    def __init__(self, fallback: bool = False) -> None:
        self.fallback = fallback
        self.calls = {"triton": 0, "sdpa_mask": 0, "sdpa_fallback": 0}

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # AttnProcessor2_0 only warns about (and ignores) a positional/`scale` argument; we ignore it too.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is not None:
            self.calls["sdpa_mask"] += 1
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        else:
            problem = _kernel_problem(query, key, value) if self.fallback else None
            if problem is None:
                hidden_states = attention(query, key, value)
                self.calls["triton"] += 1
            else:
                self.calls["sdpa_fallback"] += 1
                hidden_states = F.scaled_dot_product_attention(
                    query, key, value, dropout_p=0.0, is_causal=False
                )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def head_dim_supported(head_dim: int) -> bool:
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM


__all__ = [
    "MAX_HEAD_DIM",
    "SD_HEAD_DIMS",
    "AttentionConfig",
    "TritonAttnProcessor",
    "attention",
    "attention_config",
    "attention_reference",
    "head_dim_supported",
]
