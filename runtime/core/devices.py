"""Device and dtype arguments: defaults (CUDA and float16 when a GPU is present) and clear errors."""

from __future__ import annotations

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def resolve_device(device=None):
    """CUDA when a GPU is present unless told otherwise; a clear error for anything but cpu/cuda."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but this machine has no CUDA GPU (use device 'cpu')")
    return device


def resolve_dtype(dtype, device):
    """A torch dtype from None (float16 on CUDA, float32 on CPU), a name or a torch dtype."""
    import torch

    dtypes = {name: getattr(torch, name) for name in DTYPE_NAMES}
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {list(dtypes)}, got {dtype!r}")
        dtype = dtypes[dtype]
    if dtype not in dtypes.values():
        raise ValueError(f"dtype must be one of {list(dtypes)}, got {dtype}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bfloat16 is not supported on {torch.cuda.get_device_name(device)}; use float16")
    return dtype


def resolve_device_dtype(device=None, dtype=None):
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)
