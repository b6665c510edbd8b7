"""GroupNorm (+ optional SiLU) as Triton kernels, for Stable-Diffusion U-Nets and VAEs (inference only).

Layout of this file (kernel, launcher with input checks, module wrapper).  ``group_norm_kernel`` is one
body compiled in three phases (a ``PHASE`` constexpr):

* fused (``PHASE_FUSED``): one program per (sample, group); loops over the group twice (statistics, then
  normalize + affine + activation).  Used when a group is small enough for one program.
* split, for large groups (e.g. the SD VAE decoder at 1024 px: 32 groups of 4 channels x 1M pixels), two
  launches over a grid (N * G, K chunks): ``PHASE_PARTIAL_STATS`` writes (count, mean, M2) per chunk;
  ``PHASE_NORMALIZE`` merges the group's K partials with Chan's parallel formula and normalizes its chunk.
* ``group_norm`` (launcher), ``group_norm_reference`` (float64 torch), ``GroupNormAct`` (``nn.Module``).

Statistics are float32.  Inside a block of ``BLOCK`` elements the mean and the sum of squared deviations are
computed two-pass in registers; blocks, and later chunks, are merged with Chan et al.'s update
``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``: no ``E[x^2] - E[x]^2`` anywhere.

Memory layouts: NCHW-contiguous and channels_last (NHWC memory) 4-D tensors, and 3-D ``[N, C, L]`` tensors
that are contiguous or "channels-last" (strides ``(C*L, 1, C)``).  A group is addressed by a flat index
``i`` in ``[0, C_g * S)``: NCHW memory holds it contiguously (offset ``i``), NHWC memory as ``S`` runs of
``C_g`` channels (offset ``(i // C_g) * C + i % C_g``).  The output has the input's strides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from .launch import (
    autograd_problem,
    cdiv,
    device_problem,
    dtype_problem,
    interpreter_active,
    next_power_of_2,
    sm_count,
)

ACTIVATIONS = (None, "silu")
_ACT_CODE = {None: 0, "silu": 1}

# Split-path limits: the normalize kernel loads all of a group's partials in one block of this many.
MAX_CHUNKS = 4096
# GPU heuristics (see group_norm_config).
_GPU_BLOCK = 2048
_GPU_MIN_CHUNK = 8192
_GPU_PROGRAMS_PER_SM = 8
_GPU_MAX_AUTO_CHUNKS = 256
_INTERPRETER_BLOCK = 4096


# --------------------------------------------------------------------------------------------- kernels


# The three launches share one kernel body, specialised by the PHASE constexpr, because the Triton
# interpreter re-patches triton.language on every call of a nested @triton.jit helper (milliseconds each).
PHASE_FUSED = tl.constexpr(0)  # grid (N * G, 1): statistics of the whole group, then normalize it
PHASE_PARTIAL_STATS = tl.constexpr(1)  # grid (N * G, K): (count, mean, M2) of chunk k -> part[row, k, 0:3]
PHASE_NORMALIZE = tl.constexpr(2)  # grid (N * G, K): merge the group's K partials, then normalize chunk k


@triton.jit
def group_norm_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    part_ptr,
    G,
    S,
    CG,
    C,
    stride_n,
    stride_c,
    CHUNK,
    NUM_CHUNKS,
    eps,
    PHASE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GroupNorm over the flat index range [k * CHUNK, min((k + 1) * CHUNK, CG * S)) of group ``row``.

    ``base`` is the group's first element: ``n * stride_n + g * CG * stride_c`` (stride_c = S for NCHW,
    1 for NHWC).  Flat index ``i`` lives at ``base + i`` (NCHW) or ``base + (i // CG) * C + i % CG`` (NHWC).
    """
    row = tl.program_id(0)
    k = tl.program_id(1)
    n = row // G
    g = row % G
    base = n.to(tl.int64) * stride_n + (g * CG).to(tl.int64) * stride_c
    start = k * CHUNK
    end = tl.minimum(start + CHUNK, CG * S)

    if PHASE != PHASE_NORMALIZE:
        # Statistics of [start, end): two-pass mean / M2 inside each block (in registers), blocks merged
        # with Chan's update M2 = M2_a + M2_b + delta^2 * n_a * n_b / (n_a + n_b).
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for blk in range(start, end, BLOCK):
            idx = blk + tl.arange(0, BLOCK)
            mask = idx < end
            if CHANNELS_LAST:
                off = (idx // CG) * C + idx % CG
            else:
                off = idx
            x = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
            nb = tl.minimum(end - blk, BLOCK).to(tl.float32)
            b_mean = tl.sum(x, axis=0) / nb
            dev = tl.where(mask, x - b_mean, 0.0)
            b_m2 = tl.sum(dev * dev, axis=0)
            total = count + nb
            delta = b_mean - mean
            mean = mean + delta * (nb / total)
            m2 = m2 + b_m2 + delta * delta * (count * (nb / total))
            count = total
        if PHASE == PHASE_PARTIAL_STATS:
            p = part_ptr + (row.to(tl.int64) * NUM_CHUNKS + k) * 3
            tl.store(p, count)
            tl.store(p + 1, mean)
            tl.store(p + 2, m2)
        else:
            rstd = 1.0 / tl.sqrt(m2 / count + eps)
    else:
        # Merge of the K partials (the k-way form of Chan et al.'s parallel update):
        # n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2.
        # Every program of the group redoes this from at most MAX_CHUNKS floats: no extra launch.
        ks = tl.arange(0, BLOCK_K)
        kmask = ks < NUM_CHUNKS
        p = part_ptr + (row.to(tl.int64) * NUM_CHUNKS + ks) * 3
        cnt = tl.load(p, mask=kmask, other=0.0)
        mu = tl.load(p + 1, mask=kmask, other=0.0)
        part_m2 = tl.load(p + 2, mask=kmask, other=0.0)
        total = tl.sum(cnt, axis=0)
        mean = tl.sum(cnt * mu, axis=0) / total
        dev = mu - mean
        var = (tl.sum(part_m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)) / total
        rstd = 1.0 / tl.sqrt(var + eps)

    if PHASE != PHASE_PARTIAL_STATS:
        # y = act((x - mean) * rstd * w[c] + b[c]) over [start, end).
        c0 = g * CG
        for blk in range(start, end, BLOCK):
            idx = blk + tl.arange(0, BLOCK)
            mask = idx < end
            if CHANNELS_LAST:
                c = idx % CG
                off = (idx // CG) * C + c
            else:
                c = idx // S
                off = idx
            x = tl.load(x_ptr + base + off, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + c0 + c, mask=mask, other=1.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + c0 + c, mask=mask, other=0.0).to(tl.float32)
            if ACTIVATION == 1:
                y = y * tl.sigmoid(y)
            tl.store(y_ptr + base + off, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- heuristics


@dataclass(frozen=True)
class GroupNormConfig:
    """Launch parameters: ``num_chunks == 1`` selects the one-kernel path."""

    block: int
    chunk: int
    num_chunks: int
    num_warps: int


def group_norm_config(
    rows: int,
    group_size: int,
    *,
    interpret: bool,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> GroupNormConfig:
    """Block size and reduction split for ``rows`` (= N * groups) groups of ``group_size`` elements.

    GPU: aim for about 8 programs per SM (the kernels are memory bound and a program keeps only one block
    load in flight), never cut a group into chunks smaller than 8192 elements or into more than 256 chunks;
    chunks are multiples of the block so that chunk starts stay aligned for vector loads.  Blocks of 2048
    elements with 8 warps (8 elements, 16 bytes of fp16, per thread).  Interpreter: one program per group
    (fewest Python-level programs) unless ``chunk_size`` forces a split.  ``block_size`` (a power of two
    >= 16) overrides the block, for tests of the block-to-block merge.
    """
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of elements, got {chunk_size}")
        chunk = min(int(chunk_size), group_size)
        num_chunks = cdiv(group_size, chunk)
        if num_chunks > MAX_CHUNKS:
            raise ValueError(
                f"chunk_size {chunk_size} would cut a group of {group_size} elements into {num_chunks} "
                f"chunks; at most {MAX_CHUNKS} are allowed"
            )
        cap = _INTERPRETER_BLOCK if interpret else _GPU_BLOCK
        block = min(cap, next_power_of_2(chunk))
    elif interpret:
        block = min(_INTERPRETER_BLOCK, next_power_of_2(group_size))
        chunk, num_chunks = group_size, 1
    else:
        block = min(_GPU_BLOCK, next_power_of_2(group_size))
        index = (
            device.index if device is not None and device.index is not None else torch.cuda.current_device()
        )
        sms = sm_count(index)
        target = _GPU_PROGRAMS_PER_SM * sms
        num_chunks = max(1, min(cdiv(target, rows), group_size // _GPU_MIN_CHUNK, _GPU_MAX_AUTO_CHUNKS))
        chunk = cdiv(cdiv(group_size, num_chunks), block) * block
        num_chunks = cdiv(group_size, chunk)
        if num_chunks == 1:
            chunk = group_size
    block = block_size or max(16, block)
    num_warps = 1 if interpret else max(1, min(8, block // 256))
    return GroupNormConfig(block=block, chunk=chunk, num_chunks=num_chunks, num_warps=num_warps)


# --------------------------------------------------------------------------------------------- launcher


def _layout(x: torch.Tensor) -> str | None:
    """'nchw' (contiguous), 'nhwc' (channels-last memory) or None.  3-D [N, C, L] maps likewise."""
    if x.is_contiguous():
        return "nchw"
    n, c = x.shape[0], x.shape[1]
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    if x.ndim == 3:
        length = x.shape[2]
        expected = (c * length, 1, c)
        sizes = (n, c, length)
        if all(
            size == 1 or stride == want
            for size, stride, want in zip(sizes, x.stride(), expected, strict=True)
        ):
            return "nhwc"
    return None


def _check_params(x, num_groups, weight, bias, eps, activation, out):
    """Errors in the arguments themselves: always raised, whatever ``fallback`` says."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: None, 'silu'")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions [N, C, ...], got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if channels % num_groups != 0:
        raise ValueError(
            f"the channel count C={channels} of x (shape {tuple(x.shape)}) is not divisible by "
            f"num_groups={num_groups}; C % num_groups must be 0"
        )
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"{name} must be a tensor of shape ({channels},) or None, got {type(t).__name__}"
            )
        if tuple(t.shape) != (channels,):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected ({channels},) = (C,) for x {tuple(x.shape)}"
            )
        if t.device != x.device:
            raise ValueError(
                f"{name} is on {t.device} but x is on {x.device}; they must be on the same device"
            )
        problem = dtype_problem(t, name)
        if problem:
            raise ValueError(problem)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a tensor or None, got {type(out).__name__}")
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"out must match x in shape, dtype and device: out is {tuple(out.shape)} {out.dtype} on "
                f"{out.device}, x is {tuple(x.shape)} {x.dtype} on {x.device}"
            )
        if out.stride() != x.stride():
            raise ValueError(
                f"out has strides {out.stride()} but x has {x.stride()}; out must have x's layout"
            )


def _kernel_problem(x: torch.Tensor, weight=None, bias=None) -> str | None:
    """Why the Triton kernels cannot take ``x`` (a valid input that torch could still normalize)."""
    problem = autograd_problem(x, weight, bias)
    if problem:
        return problem
    if x.ndim not in (3, 4):
        return (
            f"x has {x.ndim} dimensions (shape {tuple(x.shape)}); "
            "the kernel takes 3-D [N, C, L] or 4-D [N, C, H, W]"
        )
    problem = dtype_problem(x, "x") or device_problem(x, "x", group_norm_kernel)
    if problem:
        return problem
    if _layout(x) is None:
        return (
            f"x has shape {tuple(x.shape)} and strides {x.stride()}: "
            "neither contiguous (NCHW) nor channels_last "
            "(NHWC); call .contiguous() or .contiguous(memory_format=torch.channels_last) first"
        )
    sample = math.prod(x.shape[1:])
    if sample >= 2**31:
        return f"one sample of x has {sample} elements; the kernel indexes a sample with int32 (< 2**31)"
    return None


def _torch_group_norm(x, num_groups, weight, bias, eps, activation, out):
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    y = F.group_norm(x, num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    if out is not None:
        out.copy_(y)
        return out
    return y


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    *,
    out: torch.Tensor | None = None,
    fallback: bool = False,
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """``act(group_norm(x))`` with Triton; the result has ``x``'s shape, dtype and strides.

    Args:
        x: ``[N, C, H, W]`` (NCHW-contiguous or channels_last) or ``[N, C, L]``; float32/float16/bfloat16,
            on CUDA (or CPU when the Triton interpreter is on).
        num_groups: groups; must divide C.
        weight, bias: per-channel affine, shape ``(C,)``, or None.
        eps: added to the variance.
        activation: None or ``"silu"`` (applied after the affine, in float32).
        out: optional output buffer with ``x``'s shape, dtype and strides (may be ``x`` itself).
        fallback: when the kernel cannot take ``x`` (device, dtype, layout, rank, autograd), compute with
            torch instead of raising.  Invalid arguments (groups, shapes, activation) raise either way.
        chunk_size: force the split reduction with chunks of this many elements (tests); None = heuristic.
        block_size: elements per block iteration (power of two >= 16; tests); None = heuristic.

    Raises:
        ValueError: naming the offending value and what is allowed.
    """
    _check_params(x, num_groups, weight, bias, eps, activation, out)
    problem = _kernel_problem(x, weight, bias)
    if problem is not None:
        if fallback:
            return _torch_group_norm(x, num_groups, weight, bias, eps, activation, out)
        raise ValueError(problem + " (pass fallback=True to use torch instead)")
    if out is None:
        out = torch.empty_like(x)  # preserve_format keeps the dense input's strides
    if x.numel() == 0:
        return out

    n, channels = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    cg = channels // num_groups
    layout = _layout(x)
    channels_last = layout == "nhwc"
    stride_n = channels * spatial
    stride_c = 1 if channels_last else spatial
    rows = n * num_groups
    group_size = cg * spatial
    interpret = interpreter_active(group_norm_kernel)
    cfg = group_norm_config(
        rows, group_size, interpret=interpret, device=x.device, chunk_size=chunk_size, block_size=block_size
    )

    has_w, has_b = weight is not None, bias is not None
    w = weight if has_w else x  # dummy pointers: never dereferenced when the flag is off
    b = bias if has_b else x
    act = _ACT_CODE[activation]
    args = (num_groups, spatial, cg, channels, stride_n, stride_c, cfg.chunk, cfg.num_chunks, float(eps))
    flags = dict(
        CHANNELS_LAST=channels_last, HAS_WEIGHT=has_w, HAS_BIAS=has_b, ACTIVATION=act, BLOCK=cfg.block
    )
    if cfg.num_chunks == 1:
        group_norm_kernel[(rows, 1)](
            x, out, w, b, x, *args, PHASE=PHASE_FUSED.value, BLOCK_K=16, num_warps=cfg.num_warps, **flags
        )
        return out
    partials = torch.empty((rows, cfg.num_chunks, 3), device=x.device, dtype=torch.float32)
    grid = (rows, cfg.num_chunks)
    block_k = max(16, next_power_of_2(cfg.num_chunks))
    for phase in (PHASE_PARTIAL_STATS.value, PHASE_NORMALIZE.value):
        group_norm_kernel[grid](
            x, out, w, b, partials, *args, PHASE=phase, BLOCK_K=block_k, num_warps=cfg.num_warps, **flags
        )
    return out


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Float64 torch GroupNorm (+ SiLU); returns ``dtype`` (default: ``x.dtype``), NCHW-contiguous."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: None, 'silu'")
    n, channels = x.shape[0], x.shape[1]
    xd = x.detach().to(torch.float64).contiguous().reshape(n, num_groups, -1)
    mean = xd.mean(dim=-1, keepdim=True)
    var = (xd - mean).square().mean(dim=-1, keepdim=True)
    y = ((xd - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, channels) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.detach().to(torch.float64).reshape(affine_shape)
    if bias is not None:
        y = y + bias.detach().to(torch.float64).reshape(affine_shape)
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y.to(dtype or x.dtype)


# --------------------------------------------------------------------------------------------- module


class GroupNormAct(nn.Module):
    """``nn.GroupNorm`` followed by an optional activation, as one Triton call.

    Parameters are named like ``nn.GroupNorm``'s (``weight``, ``bias``), so state dicts are interchangeable;
    ``from_group_norm`` shares the original module's parameters instead of copying them.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        activation: str | None = None,
        *,
        fallback: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: None, 'silu'")
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.activation = activation
        self.fallback = fallback
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_group_norm(
        cls, gn: nn.GroupNorm, activation: str | None = None, *, fallback: bool = False
    ) -> GroupNormAct:
        if not isinstance(gn, nn.GroupNorm):
            raise ValueError(f"from_group_norm needs an nn.GroupNorm, got {type(gn).__name__}")
        mod = cls(
            gn.num_groups, gn.num_channels, gn.eps, affine=False, activation=activation, fallback=fallback
        )
        mod.affine = gn.affine
        if gn.affine:
            mod.weight = gn.weight  # the same Parameter objects: no copy, same state-dict keys
            mod.bias = gn.bias
        mod.train(gn.training)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(
            x, self.num_groups, self.weight, self.bias, self.eps, self.activation, fallback=self.fallback
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"activation={self.activation!r}"
        )


__all__ = [
    "ACTIVATIONS",
    "GroupNormAct",
    "GroupNormConfig",
    "group_norm",
    "group_norm_config",
    "group_norm_reference",
]
