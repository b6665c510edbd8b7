"""A pipeline's adapters: LoRAs merged into its weights through the backend (:mod:`diffrt.models.lora`) and
textual-inversion tokens added to its text encoders (:mod:`diffrt.models.inversion`)."""

from __future__ import annotations

from ..models import inversion, lora


class Adapters:
    """The LoRAs and textual inversions of one loaded model on one backend. Not thread-safe on its own: the
    pipeline calls it under its lock."""

    def __init__(self, model, backend):
        self.model, self.components, self.backend = model, model.components, backend
        self._loras: lora.Adapters | None = None

    def loras(self) -> dict[str, dict]:
        """The loaded LoRAs: ``{name: {path, scale, ranks, layers, parts, targets}}``."""
        return self._loras.info() if self._loras else {}

    def load_lora(self, path, name: str | None, scale: float) -> str:
        return self._lora_set().load(path, name, scale).name

    def set_loras(self, scales: dict[str, float]) -> None:
        self._lora_set().set(scales)

    def unload_lora(self, name: str) -> None:
        self._lora_set().unload(name)

    def _lora_set(self) -> lora.Adapters:
        if self._loras is None:
            if not self.backend.writes_weights:
                raise ValueError(f"the {self.backend.name} backend cannot replace weights, so it takes no LoRA")
            self._loras = lora.Adapters(self.components, self.backend.write_weights, self.backend.weights_in_place)
        return self._loras

    def check_tokens(self) -> None:
        """Why no textual inversion can be added here, before anything is read."""
        if not self.backend.adds_tokens:
            raise ValueError(f"the {self.backend.name} backend cannot grow its text encoders' vocabulary: load "
                             "textual inversions with the torch, compile, triton or onnxruntime backend")  # fmt: skip
        if self.components.deployed:
            raise ValueError("a deployed export has no text-encoder modules to add tokens to: load the model it was "
                             "exported from")  # fmt: skip

    def load_textual_inversion(self, path, token: str | None) -> list[str]:
        """Add the embedding's tokens; the backend's exported tables (onnxruntime) are located before anything
        changes, so a graph without that initializer fails with the model untouched."""
        encoders = self.components.text_encoders
        writers = [self.backend.token_table(graph, encoder.get_input_embeddings().weight)
                   for graph, encoder in zip(self.model.text_graphs(), encoders, strict=True)]  # fmt: skip
        tokens, changed = inversion.load(self.components, path, token)
        for index in changed:
            if writers[index] is not None:
                writers[index](encoders[index].get_input_embeddings().weight)
        return tokens
