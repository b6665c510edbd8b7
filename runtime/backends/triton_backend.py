"""The Triton backend: eager PyTorch with the fused Triton kernels patched in, channels_last convolutions,
and on CUDA the whole denoising loop captured as one CUDA graph per input shape and setting."""

from __future__ import annotations

import importlib.util
import os

import torch

from .torch_backend import TorchBackend


def is_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed (pip install 'diffrt[gpu]')"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 to run them, slowly, on the CPU)"


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, components, device, dtype, capture_loop: bool = True, max_graphs: int = 8):
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton backend on the CPU needs TRITON_INTERPRET=1 (the Triton interpreter)")
        super().__init__(components, device, dtype)
        from ..kernels import patch

        self.patches = [patch(components.unet), patch(components.vae)]
        for module in (components.unet, components.vae):
            module.to(memory_format=torch.channels_last)
        self.loop_graphs = None
        if capture_loop and device.type == "cuda":
            from ..graphs import LoopGraphCache

            self.loop_graphs = LoopGraphCache(max_graphs)

    def _unet(self, sample, *args, **kwargs):
        return super()._unet(sample.contiguous(memory_format=torch.channels_last), *args, **kwargs)

    def upcast_vae(self) -> None:
        super().upcast_vae()
        if self.loop_graphs is not None:
            self.loop_graphs.clear()

    def restore(self) -> None:
        """Undo the kernel patches (the modules go back to plain PyTorch)."""
        for handle in self.patches:
            handle.restore()
        self.patches = []
        if self.loop_graphs is not None:
            self.loop_graphs.clear()


def create(components, device, dtype, **options) -> TritonBackend:
    unknown = set(options) - {"capture_loop", "max_graphs"}
    if unknown:
        allowed = "capture_loop, max_graphs"
        raise ValueError(f"option(s) {sorted(unknown)} do not apply to the triton backend; allowed: {allowed}")
    return TritonBackend(components, device, dtype, **options)
