"""One fingerprint of model weights, for everything that must be tied to them: export caches, quality
baselines, the classifier's reference statistics.

SHA-256 over every state-dict entry of the given modules, in sorted order: its label and name, its shape, and
its values as float32 bytes (float16 and bfloat16 widen losslessly, so the same weights loaded in another
float dtype fingerprint the same; non-float tensors contribute their own bytes). File paths play no part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def _value_bytes(tensor) -> memoryview:
    import torch

    flat = tensor.detach().reshape(-1).cpu()
    if flat.is_floating_point() and flat.element_size() < 4:
        flat = flat.to(torch.float32)
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def weights_digest(modules: Mapping[str, object]) -> str:
    """The hex SHA-256 of the weights of ``modules`` (label -> ``nn.Module``)."""
    if not isinstance(modules, Mapping):
        raise TypeError(f"weights_digest takes a mapping of label -> module, got {type(modules).__name__}")
    digest = hashlib.sha256()
    for label, module in sorted(modules.items()):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{label}.{name}|{tuple(tensor.shape)}|".encode())
            digest.update(_value_bytes(tensor))
    return digest.hexdigest()
