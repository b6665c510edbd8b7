"""Compile the kernels for an NVIDIA GPU architecture without a GPU (Triton's bundled ``ptxas``).

``python -m diffrt.kernels.aot_check --arch 90`` lowers every launch configuration the launchers can pick
(or a quick subset) through TTIR -> TTGIR -> LLVM -> PTX -> cubin for ``sm_<arch>`` and prints registers,
spill (stack) bytes and shared memory per configuration, read from ``cuobjdump --dump-resource-usage``.
This catches what the interpreter cannot: ``tl.dot`` shape rules, layout conversions, register pressure.

It must run with the Triton interpreter off (``TRITON_INTERPRET`` unset before importing this package):
the interpreter replaces ``@triton.jit`` functions by Python callables that cannot be compiled.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .adaln import adaln_kernel, adaln_warps
from .attention import attention_config, attn_fwd_kernel
from .group_norm import PHASE_FUSED, PHASE_NORMALIZE, PHASE_PARTIAL_STATS, group_norm_kernel
from .launch import interpreter_active, next_power_of_2
from .qk_norm import rms_rope_kernel

_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _resource_usage(compiled) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in compiled.asm or not os.path.exists(tool):
        return "resource usage unavailable"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    lines = [line.strip() for line in text.splitlines() if "REG:" in line]
    if not lines:
        return "resource usage unavailable"
    fields = dict(item.split(":", 1) for item in lines[-1].split() if ":" in item)
    return f"registers {fields.get('REG')}, spill bytes {fields.get('STACK')}"


def compile_group_norm(
    dtype: torch.dtype, phase: int, channels_last: bool, block: int, num_warps: int, target
):
    ty = _TYPE[dtype]
    signature = {
        "x_ptr": f"*{ty}",
        "y_ptr": f"*{ty}",
        "w_ptr": f"*{ty}",
        "b_ptr": f"*{ty}",
        "part_ptr": "*fp32",
    }
    for name in ("G", "S", "CG", "C", "stride_n", "stride_c", "CHUNK", "NUM_CHUNKS"):
        signature[name] = "i32"
    signature["eps"] = "fp32"
    constants = dict(
        PHASE=phase, CHANNELS_LAST=channels_last, HAS_WEIGHT=True, HAS_BIAS=True, ACTIVATION=1, BLOCK=block,
        BLOCK_K=64,
    )  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    src = ASTSource(group_norm_kernel, signature, constants)
    return triton.compile(src, target=target, options={"num_warps": num_warps})


def compile_attention(dtype: torch.dtype, head_dim: int, seq_q: int, seq_k: int, target):
    cfg = attention_config(seq_q, seq_k, head_dim, dtype, interpret=False)
    ty = _TYPE[dtype]
    signature = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "v_ptr": f"*{ty}", "o_ptr": f"*{ty}"}
    constants = {}
    for t, dims in (("q", "bhm"), ("k", "bhn"), ("v", "bhn"), ("o", "bhm")):
        for d in dims:
            signature[f"stride_{t}{d}"] = "i32"
        signature[f"stride_{t}d"] = "constexpr"  # unit head-dim stride, as the JIT specialises it
        constants[f"stride_{t}d"] = 1
    signature.update({"H": "i32", "SEQ_Q": "i32", "SEQ_K": "i32", "qk_scale": "fp32"})
    constants.update(
        HEAD_DIM=head_dim, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        EVEN_N=seq_k % cfg.block_n == 0, UPCAST=dtype == torch.float32,
    )  # fmt: skip
    signature.update({name: "constexpr" for name in constants if name not in signature})
    src = ASTSource(attn_fwd_kernel, signature, constants)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=target, options=options), cfg


def compile_adaln(dtype: torch.dtype, gated: bool, norm: bool, clip: bool, width: int, target):
    ty = _TYPE[dtype]
    signature = {name: f"*{ty}" for name in ("x_ptr", "y_ptr", "gate_ptr", "shift_ptr", "scale_ptr", "res_ptr",
                                             "out_ptr")}  # fmt: skip
    for name in ("L", "D", "stride_xb", "stride_xl", "stride_yb", "stride_yl", "stride_rb", "stride_rl", "stride_ob",
                 "stride_ol", "stride_gate", "stride_shift", "stride_scale"):  # fmt: skip
        signature[name] = "i32"
    signature["eps"] = "fp32"
    constants = dict(GATED=gated, NORM=norm, CLIP=clip, BLOCK_D=next_power_of_2(width))
    signature.update({name: "constexpr" for name in constants})
    src = ASTSource(adaln_kernel, signature, constants)
    return triton.compile(src, target=target, options={"num_warps": adaln_warps(width, False)})


def compile_rms_rope(dtype: torch.dtype, heads: int, head_dim: int, rope: bool, target):
    ty = _TYPE[dtype]
    signature = {"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "o_ptr": f"*{ty}"}
    for name in ("L", "H", "D", "offset", "stride_xb", "stride_xl", "stride_xh", "stride_ob", "stride_ol",
                 "stride_oh", "stride_cos"):  # fmt: skip
        signature[name] = "i32"
    signature["eps"] = "fp32"
    block_h, block_d = next_power_of_2(heads), max(16, next_power_of_2(head_dim))
    constants = dict(NORM=True, HAS_WEIGHT=True, ROPE=rope, BLOCK_H=block_h, BLOCK_D=block_d)
    signature.update({name: "constexpr" for name in constants})
    src = ASTSource(rms_rope_kernel, signature, constants)
    return triton.compile(src, target=target, options={"num_warps": max(1, min(8, block_h * block_d // 512))})


def configurations(quick: bool):
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    phases = [PHASE_FUSED.value, PHASE_PARTIAL_STATS.value, PHASE_NORMALIZE.value]
    for dtype in dtypes:
        for phase in phases:
            for channels_last in (False, True) if not quick or phase == PHASE_NORMALIZE.value else (False,):
                yield ("group_norm", dtype, phase, channels_last)
    attn = [(40, 4096, 4096), (80, 1024, 77), (160, 256, 256)]
    if not quick:
        attn += [(64, 4096, 4096), (64, 4096, 77), (128, 1024, 1024), (40, 16384, 77), (8, 64, 5)]
    if not quick:  # FLUX.1-dev at 1024 px (512 + 4096 tokens, head dim 128), SD3 (333 + 4096, 64)
        attn += [(128, 4608, 4608), (64, 4429, 4429)]
    for dtype in [torch.float16, torch.bfloat16] if not quick else [torch.float16]:
        for shape in attn:
            yield ("attention", dtype, *shape)
    yield ("attention", torch.float32, 80, 300, 300)
    # adaLN: (gated, norm, clip) as the fused blocks launch it, at SD3.5-large's and FLUX.1's widths
    modes = [(False, True, False), (True, True, False), (True, False, True)]
    for dtype in [torch.float16] if quick else [torch.float16, torch.bfloat16, torch.float32]:
        for width in [3072] if quick else [1536, 2432, 3072]:
            for mode in modes:
                yield ("adaln", dtype, *mode, width)
        # query/key norm (+ rope): FLUX's 24 heads of 128, SD3.5-large's 38 of 64
        for heads, head_dim, rope in [(24, 128, True), (38, 64, False)]:
            yield ("rms_rope", dtype, heads, head_dim, rope)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffrt.kernels.aot_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 = A100, 90 = H100)")
    parser.add_argument("--quick", action="store_true", help="a subset of the configurations")
    args = parser.parse_args(argv)
    if interpreter_active(group_norm_kernel):
        print("TRITON_INTERPRET is set: unset it to compile for a GPU", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    for item in configurations(args.quick):
        if item[0] == "group_norm":
            _, dtype, phase, channels_last = item
            compiled = compile_group_norm(dtype, phase, channels_last, 2048, 8, target)
            what = f"group_norm {_TYPE[dtype]} phase={phase} channels_last={channels_last}"
        elif item[0] == "adaln":
            _, dtype, gated, norm, clip, width = item
            compiled = compile_adaln(dtype, gated, norm, clip, width, target)
            what = f"adaln {_TYPE[dtype]} width={width} gated={gated} norm={norm} clip={clip}"
        elif item[0] == "rms_rope":
            _, dtype, heads, head_dim, rope = item
            compiled = compile_rms_rope(dtype, heads, head_dim, rope, target)
            what = f"rms_rope {_TYPE[dtype]} heads={heads} head_dim={head_dim} rope={rope}"
        else:
            _, dtype, head_dim, seq_q, seq_k = item
            compiled, cfg = compile_attention(dtype, head_dim, seq_q, seq_k, target)
            what = (
                f"attention {_TYPE[dtype]} D={head_dim} Lq={seq_q} Lk={seq_k} "
                f"tiles {cfg.block_m}x{cfg.block_n}x{cfg.block_d} "
                f"warps={cfg.num_warps} stages={cfg.num_stages}"
            )
        print(
            f"sm_{args.arch} {what}: shared {compiled.metadata.shared} B, {_resource_usage(compiled)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
