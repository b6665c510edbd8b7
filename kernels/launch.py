"""Helpers shared by the Triton kernels: interpreter detection, device checks, small integer maths."""

from __future__ import annotations

import functools

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16, bfloat16"


def interpreter_active(kernel) -> bool:
    """True when ``kernel`` was decorated while ``TRITON_INTERPRET=1`` (Triton decides at decoration time)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old Triton
        return False
    return isinstance(kernel, InterpretedFunction)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=16)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_problem(t: torch.Tensor, name: str, kernel) -> str | None:
    """Why ``kernel`` cannot run on ``t``'s device, or None when it can."""
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu":
        if interpreter_active(kernel):
            return None
        return (
            f"{name} is on the CPU but the Triton interpreter is off: the kernels need a CUDA device, or "
            "TRITON_INTERPRET=1 set before diffrt.kernels is imported (CPU, slow, for tests)"
        )
    return (
        f"{name} is on device {t.device}; the Triton kernels need a CUDA device "
        "(or CPU with TRITON_INTERPRET=1)"
    )


def autograd_problem(*tensors: torch.Tensor | None) -> str | None:
    """The kernels are forward-only: refuse inputs that autograd would need to differentiate."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return (
            "an input requires grad while autograd is on, but the Triton kernels are inference-only "
            "(no backward); run under torch.no_grad() or torch.inference_mode()"
        )
    return None


def dtype_problem(t: torch.Tensor, name: str) -> str | None:
    if t.dtype in SUPPORTED_DTYPES:
        return None
    return f"{name} has dtype {t.dtype}; supported dtypes are {_DTYPE_NAMES}"


__all__ = [
    "SUPPORTED_DTYPES",
    "autograd_problem",
    "cdiv",
    "device_problem",
    "dtype_problem",
    "interpreter_active",
    "next_power_of_2",
    "sm_count",
]
