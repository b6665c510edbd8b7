"""The eager PyTorch backend: the family's graph modules, run on the diffusers/transformers modules themselves.

Inputs are cast as their specs say: "float" inputs to the model's dtype (the VAE's own for the VAE graphs,
float32 after ``upcast_vae``), fixed-dtype inputs (the timestep, token ids) to theirs.
"""

from __future__ import annotations

import torch

from ..core import step_cache
from ..models import families, lora
from ..models.families.base import VAE_GRAPHS
from .base import Backend

OPTIONS: tuple[str, ...] = ()


def is_available() -> tuple[bool, str]:
    return True, ""


class TorchBackend(Backend):
    name = "torch"
    caches_steps = True
    writes_weights = True
    weights_in_place = True  # write_weights copies into the parameters: LoRAs merge a layer at a time
    adds_tokens = True  # runs the text encoders' own modules: textual inversions add rows to them

    def __init__(self, components, device: torch.device, dtype: torch.dtype):
        self.components = components
        self.device, self.dtype = device, dtype
        self.model = families.model(components)
        self.specs = self.model.graph_specs()
        for module in (components.denoiser, components.vae, *components.text_encoders, *components.controlnets):
            module.to(device)
            if module.dtype != dtype:
                module.to(dtype)
        self.vae_dtype = dtype
        self.modules = {name: self.model.graph_module(name) for name in self.specs}

    def upcast_vae(self) -> None:
        """Keep the VAE in float32 from now on (fp16 VAEs overflow on some latents: black/NaN images)."""
        self.components.vae.to(torch.float32)
        self.vae_dtype = torch.float32

    def write_weights(self, part: str, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``{layer path: weight}`` into ``part``'s parameters in place (LoRAs): compiled code and captured
        loops read the same storage, so nothing is recompiled or re-captured."""
        lora.write_into_modules(self.components, part, weights)

    def graph_module(self, graph: str):
        """What runs ``graph`` (the compile backend swaps in compiled modules)."""
        return self.modules[graph]

    def prepare(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inputs on the device in the dtypes the graph's spec gives."""
        spec = self.specs[graph]
        if set(inputs) != set(spec.input_names):
            raise ValueError(f"graph {graph!r} takes inputs {spec.input_names}, got {sorted(inputs)}")
        precision = _PRECISIONS[self.vae_dtype if graph in VAE_GRAPHS else self.dtype]
        return {t.name: inputs[t.name].to(self.device, t.torch_dtype(precision)) for t in spec.inputs}

    def capture_state(self) -> tuple:
        return (self.name, str(self.dtype), str(self.vae_dtype))

    def run(self, graph: str, **inputs) -> dict[str, torch.Tensor]:
        if graph not in self.specs:
            raise ValueError(f"unknown graph {graph!r}; this model has {list(self.specs)}")
        with torch.inference_mode():  # a with block, not a decorator: one frame less on every model call
            out = self.graph_module(graph)(**self.prepare(graph, inputs))
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.specs[graph].output_names, out, strict=True))

    @torch.inference_mode()
    def run_cached(self, graph: str, session, **inputs) -> dict[str, torch.Tensor]:
        """Run the denoiser ``graph`` under a step cache (:mod:`diffrt.core.step_cache`): the session decides what
        this call computes and keeps what later calls reuse."""
        if graph != self.model.denoiser_part:
            raise ValueError(f"a step cache runs the denoiser graph {self.model.denoiser_part!r}, not {graph!r}")
        run = step_cache.RUNNERS[session.config.kind]
        out = run(session, lambda piece: self.cache_piece(graph, piece), self.prepare(graph, inputs))
        return {self.specs[graph].output_names[0]: out}

    def cache_piece(self, graph: str, piece: str):
        """The graph module's function ``piece`` (a step cache's partial passes; compiled by the compile backend)."""
        return getattr(self.modules[graph], piece)


_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def create(components, device, dtype, **options) -> TorchBackend:
    return TorchBackend(components, device, dtype)
