"""The interface every backend implements: run a named graph on named tensors, and say what else it can do.

Graphs are the model's (:mod:`diffrt.models.families`): ``text_encoder`` (and ``text_encoder_2``, ...), the
denoiser (``unet`` or ``transformer``), ``controlnet_K``, ``vae_encoder`` and ``vae_decoder``, with the input
and output names of their specs (``specs``). What a backend can do beyond running graphs is declared here, so
the pipeline asks attributes instead of probing for methods: step caches (``caches_steps``, ``run_cached``),
new weights (``writes_weights``, ``write_weights``: LoRAs), new tokens (``adds_tokens``, ``token_table``:
textual inversion) and whole-loop capture (``loop_capture``, ``capture_state``).
"""

from __future__ import annotations

import torch

from ..core.graphspec import GraphSpec
from .graphs import LoopGraphCache


class Backend:
    """The defaults: a backend that only runs graphs. Subclasses set what they support."""

    name = "backend"
    specs: dict[str, GraphSpec]
    loop_capture: LoopGraphCache | None = None  # captures the whole denoising loop when not None
    caches_steps = False  # run_cached runs a step cache's passes (torch-based backends)
    writes_weights = False  # write_weights replaces layers' weights (LoRAs)
    weights_in_place = False  # write_weights copies into the modules' own parameters: a layer at a time is enough
    adds_tokens = False  # textual inversions can add tokens (token_table writes them where needed)

    def run(self, graph: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``graph`` on its named inputs; its named outputs."""
        raise NotImplementedError

    def run_cached(self, graph: str, session, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the denoiser ``graph`` through a step cache's ``session`` (:mod:`diffrt.core.step_cache`)."""
        raise ValueError(f"cache= needs a torch-based backend (torch, compile, triton): the {self.name} backend runs "
                         "its exported graph whole")  # fmt: skip

    def write_weights(self, part: str, weights: dict[str, torch.Tensor]) -> None:
        """Put ``{layer path: weight}`` into ``part``'s weights (LoRAs)."""
        raise ValueError(f"the {self.name} backend cannot replace weights, so it takes no LoRA")

    def token_table(self, graph: str, base: torch.Tensor):
        """A writer for text-encoder ``graph``'s grown token-embedding table, or None where the text encoder's
        own module grows (the torch-based backends)."""
        return None

    def upcast_vae(self) -> None:
        """Run the VAE in float32 from now on (float16 VAEs overflow on some latents)."""
        raise NotImplementedError

    def capture_state(self) -> tuple:
        """What a captured loop depends on in the backend itself (dtypes, kernel patches): part of its key."""
        return ()


def check_options(backend: str, options: dict, allowed) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) or "none"
        raise ValueError(f"option(s) {unknown} do not apply to the {backend} backend; allowed: {listed}")
