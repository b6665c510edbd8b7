"""Caption embeddings for training, computed with the frozen text encoder exactly as the pipeline does.

The encoder itself is a runtime module (:mod:`diffrt.models.minilm`); its names are re-exported here for the trainers.
"""

from __future__ import annotations

import torch

from ..core.text import tokenize
from ..models.minilm import HIDDEN_SIZE, INSTALL_HINT, MAX_LENGTH, encoder_path, load_text_encoder

__all__ = ["HIDDEN_SIZE", "INSTALL_HINT", "MAX_LENGTH", "encode_captions", "encoder_path", "load_text_encoder"]


@torch.no_grad()
def encode_captions(encoder, tokenizer, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Per-token embeddings [len(captions), max_length, 384] in float32 on the CPU, as the pipeline makes them."""
    out = []
    for start in range(0, len(captions), batch_size):
        ids = tokenize(tokenizer, captions[start : start + batch_size]).to(encoder.device)
        out.append(encoder(input_ids=ids).last_hidden_state.float().cpu())
    return torch.cat(out)
