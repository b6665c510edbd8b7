"""Textual inversion: learned token embeddings added to a model's tokenizers and text encoders.

Files are safetensors only: A1111's ``emb_params`` (``[vectors, dim]``), SDXL's ``clip_l``/``clip_g`` (one per
text encoder), or diffusers' ``learned_embeds.safetensors`` (``{token: vector(s)}``). An embedding of ``n``
vectors becomes the tokens ``T, T_1, ..., T_{n-1}``; a prompt naming ``T`` is given all of them
(:func:`diffrt.core.text.expand_added_tokens`, per tokenizer, as diffusers does). The token defaults to the file's
own (diffusers) or the file name (A1111's convention).

The tokens are added and the embedding rows written into the text encoders' own modules, so the torch-based
backends run them as they are; everything is checked before anything changes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.files import safetensors_file

FOLDER_FILE = "learned_embeds.safetensors"  # what diffusers' textual-inversion training writes
SDXL_KEYS = ("clip_l", "clip_g")  # the first and the second text encoder's vectors


def read(path, encoders: int) -> tuple[str | None, dict[int, torch.Tensor]]:
    """(the file's own token or None, {text encoder index: vectors [n, dim]})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = safetensors_file(path, FOLDER_FILE, "textual-inversion")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from err
    if "emb_params" in tensors:
        return None, {0: _vectors(tensors["emb_params"], file)}
    if any(key in tensors for key in SDXL_KEYS):
        if encoders < 2:
            raise ValueError(f"{file} holds SDXL embeddings ({', '.join(k for k in SDXL_KEYS if k in tensors)}) "
                             f"but this model has {encoders} text encoder")  # fmt: skip
        return None, {k: _vectors(tensors[key], file) for k, key in enumerate(SDXL_KEYS) if key in tensors}
    if len(tensors) == 1:
        (token, vectors), = tensors.items()
        return token, {0: _vectors(vectors, file)}
    raise ValueError(f"{file} is no textual-inversion file: expected emb_params, clip_l/clip_g or one "
                     f"{{token: vectors}} entry, found keys {sorted(tensors)[:6]}")  # fmt: skip


def _vectors(tensor: torch.Tensor, file: Path) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[0] < 1:
        raise ValueError(f"{file}: embeddings must be [vectors, dim], got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{file}: embeddings must be finite floats, got {tensor.dtype} with NaN, inf or no floats")
    return tensor


def load(components, path, token: str | None = None) -> tuple[list[str], list[int]]:
    """Add the embedding at ``path`` to ``components``' tokenizers and text encoders: its tokens and the indices
    of the text encoders it changed."""
    own, by_encoder = read(path, len(components.text_encoders))
    token = token or own or Path(path).stem
    count = next(iter(by_encoder.values())).shape[0]
    tokens = [token] + [f"{token}_{i}" for i in range(1, count)]
    for index, vectors in by_encoder.items():  # every check first: nothing changes on a bad file
        tokenizer, encoder = components.tokenizers[index], components.text_encoders[index]
        dim = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape != (count, dim):
            raise ValueError(f"{path}: embedding of shape {tuple(vectors.shape)} for text encoder {index + 1}, "
                             f"whose token embeddings are {dim}-d ({count} vectors expected)")  # fmt: skip
        for token in tokens:
            if not token.strip():
                raise ValueError(f"{path}: token {token!r} is blank; a token must hold a visible character")
            word = existing_word(tokenizer, token)
            if word is not None:
                seen_as = "" if word == token else f" (it reads {token!r} as {word!r})"
                raise ValueError(f"token {token!r} is already in the tokenizer of text encoder {index + 1}{seen_as}: "
                                 "it would change every prompt that uses it; give another token=")  # fmt: skip
    for index, vectors in by_encoder.items():
        _add(components.tokenizers[index], components.text_encoders[index], tokens, vectors)
    return tokens, sorted(by_encoder)


def existing_word(tokenizer, token: str) -> str | None:
    """The token of the tokenizer that ``token`` already is, as the tokenizer reads text (after its own
    normalization: "Dress" is CLIP's "dress</w>"), or None: adding it would change prompts that use that word."""
    if token in tokenizer.get_vocab():
        return token
    pieces = tokenizer.tokenize(token)
    if len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) != tokenizer.unk_token_id:
        return pieces[0]
    return None


def _add(tokenizer, encoder, tokens: list[str], vectors: torch.Tensor) -> None:
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = encoder.get_input_embeddings()
    if max(ids) >= table.weight.shape[0]:
        encoder.resize_token_embeddings(max(ids) + 1)
        table = encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[ids] = vectors.to(table.weight.device, table.weight.dtype)
