"""The interface every backend implements: run a named graph on named tensors.

Graphs are the family's (:mod:`diffrt.families`): ``text_encoder`` (and ``text_encoder_2`` for SDXL),
``unet``, ``vae_encoder`` and ``vae_decoder``, with the input and output names of their specs. A backend says
what it can do beyond that through ``loop_capture``: the whole-loop CUDA-graph cache when it can capture the
denoising loop, else None.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..graphs import LoopGraphCache


@runtime_checkable
class Backend(Protocol):
    name: str
    loop_capture: LoopGraphCache | None  # captures the whole denoising loop when not None

    def run(self, graph: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``graph`` on its named inputs; its named outputs."""
        ...

    def upcast_vae(self) -> None:
        """Run the VAE in float32 from now on (float16 VAEs overflow on some latents)."""
        ...

    def capture_state(self) -> tuple:
        """What a captured loop depends on in the backend itself (dtypes, kernel patches): part of its key.
        Needed only where ``loop_capture`` is not None."""
        ...


def check_options(backend: str, options: dict, allowed) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) or "none"
        raise ValueError(f"option(s) {unknown} do not apply to the {backend} backend; allowed: {listed}")
