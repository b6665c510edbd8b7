"""The Triton backend: eager PyTorch with the fused Triton kernels patched in (U-Nets, VAEs and ControlNets:
GroupNorm+SiLU and attention; the SD3 and FLUX.1 transformers: fused adaLN blocks, query/key norm with rotary
embeddings, joint attention), channels_last convolutions, and on CUDA the whole denoising loop captured as one
CUDA graph per input shape and setting.

The kernels and their patcher are :mod:`diffrt.kernels` (imported when the backend is created: Triton loads then).
"""

from __future__ import annotations

import os

import torch

from ..core import optional
from ..models.families import unet_control
from .graphs import LoopGraphCache
from .torch_backend import TorchBackend

OPTIONS = ("capture_loop", "max_graphs")


def is_available() -> tuple[bool, str]:
    if not optional.installed("triton"):
        return False, "the triton package is not installed (pip install 'diffrt[gpu]')"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 to run them, slowly, on the CPU)"


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, components, device, dtype, *, capture_loop: bool = True, max_graphs: int = 8):
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton backend on the CPU needs TRITON_INTERPRET=1 (the Triton interpreter)")
        from ..kernels import patch as patcher

        super().__init__(components, device, dtype)
        # the denoiser's kernels (a U-Net's GroupNorm+SiLU and attention, a transformer's fused blocks), the VAE's
        # and the ControlNets'; the convolutional ones also go channels_last
        self.patches = [patcher(module) for module in (components.denoiser, components.vae, *components.controlnets)]
        for module in (components.unet, components.vae, *components.controlnets):
            if module is not None:
                module.to(memory_format=torch.channels_last)
        if capture_loop and device.type == "cuda":
            self.loop_capture = LoopGraphCache(max_graphs)

    def prepare(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prepared = super().prepare(graph, inputs)
        if graph == "unet" or unet_control.is_graph(graph):
            prepared["sample"] = prepared["sample"].contiguous(memory_format=torch.channels_last)
        return prepared

    def capture_state(self) -> tuple:
        return (*super().capture_state(), tuple(type(handle).__name__ for handle in self.patches))

    def upcast_vae(self) -> None:
        super().upcast_vae()
        if self.loop_capture is not None:
            self.loop_capture.clear()

    def restore(self) -> None:
        """Undo the kernel patches (the modules go back to plain PyTorch)."""
        for handle in self.patches:
            handle.restore()
        self.patches = []
        if self.loop_capture is not None:
            self.loop_capture.clear()


def create(components, device, dtype, **options) -> TritonBackend:
    return TritonBackend(components, device, dtype, **options)
