"""Prompt tokenization: fixed-length padding, truncation with a warning, and the presets' tokenizer."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE tokenizers (GPT-2, CLIP) use for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def character_clip_tokenizer(vocab_size: int = CLIP_VOCAB_SIZE, max_length: int = CLIP_MAX_LENGTH):
    """A real ``CLIPTokenizer`` with CLIP's special tokens, vocabulary size and padding, but no merges.

    It splits text into bytes instead of CLIP's learned subwords (CLIP's vocabulary file cannot be fetched
    here), so the text encoder sees the same shapes and does the same compute as with CLIP's own tokenizer.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    if vocab_size < len(vocab) + 2:
        raise ValueError(f"vocab_size must be >= {len(vocab) + 2}, got {vocab_size}")
    for i in range(len(vocab), vocab_size - 2):
        vocab[f"<|unused{i}|>"] = i
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


T5_VOCAB_SIZE = 32128  # T5 v1.1's embedding rows (32,100 pieces + 28 padding rows)


def character_t5_tokenizer(vocab_size: int = T5_VOCAB_SIZE, max_length: int = 512):
    """A real ``T5Tokenizer`` (Unigram, T5's special tokens: pad 0, eos 1, unk 2; an EOS after each prompt)
    whose pieces are single characters, for the presets' T5 encoders: T5's sentencepiece model cannot be
    fetched here, and the encoder's shapes and compute do not depend on the split."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(symbol, -2.0) for symbol in _byte_symbols()]
    pieces += [("\u2581" + symbol, -1.5) for symbol in _byte_symbols()[:94]]  # word-initial printable ASCII
    if vocab_size < len(pieces):
        raise ValueError(f"vocab_size must be >= {len(pieces)}, got {vocab_size}")
    pieces += [(f"<unused{i}>", -100.0) for i in range(len(pieces), vocab_size)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def expand_added_tokens(prompt: str, tokenizer) -> str:
    """``prompt`` with each multi-vector textual-inversion token ``T`` of ``tokenizer`` written as
    ``T T_1 ... T_{n-1}`` (its vectors are separate tokens; diffusers' ``maybe_convert_prompt`` does the same)."""
    added = getattr(tokenizer, "added_tokens_encoder", None)
    if not added or not any(token.endswith("_1") for token in added):  # no multi-vector token: nothing to do
        return prompt
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            prompt = prompt.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, count)]))
    return prompt


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None, warn: bool = True) -> torch.Tensor:
    """Token ids padded to the encoder's length; longer prompts are truncated, with one warning for the call
    however many images share the prompt (``warn=False``: none, e.g. for a model's second tokenizer)."""
    max_length = max_length or tokenizer.model_max_length
    if warn:
        _warn_truncated(tokenizer, list(dict.fromkeys(prompts)), max_length)
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return batch.input_ids


def _warn_truncated(tokenizer, prompts: list[str], max_length: int) -> None:
    lengths = [len(ids) for ids in tokenizer(prompts, padding=False, truncation=False).input_ids]
    long = [(prompt, n) for prompt, n in zip(prompts, lengths, strict=True) if n > max_length]
    if long:
        prompt, n = max(long, key=lambda item: item[1])
        which = "prompt is" if len(prompts) == 1 else f"{len(long)} of {len(prompts)} distinct prompts are"
        log.warning("%s longer than the text encoder's %d tokens: up to %d tokens dropped (%r...)",
                    which, max_length, n - max_length, prompt[:40])  # fmt: skip


class SavedTokenizer:
    """A fast tokenizer read back from its ``tokenizers`` JSON, called as the pipeline calls transformers'
    tokenizers (:func:`tokenize`): padded to a fixed length with the model's pad token, truncated before the
    special tokens are added, so the ids equal the transformers tokenizer it was saved from. A deployed export
    (:mod:`diffrt.models.deployment`) tokenizes with it, without importing transformers."""

    def __init__(self, tokenizer_json: str, model_max_length: int, pad_id: int, pad_token: str):
        from tokenizers import Tokenizer

        self._json, self.model_max_length = tokenizer_json, int(model_max_length)
        self.pad_id, self.pad_token = int(pad_id), pad_token
        self._plain = Tokenizer.from_str(tokenizer_json)
        self._plain.no_padding()
        self._plain.no_truncation()
        self._fixed: dict[int, object] = {}

    @classmethod
    def from_transformers(cls, tokenizer) -> SavedTokenizer:
        """The same tokenizer, from a transformers fast tokenizer (its ``backend_tokenizer``)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend to save")
        return cls(backend.to_str(), tokenizer.model_max_length, tokenizer.pad_token_id, tokenizer.pad_token)

    def settings(self) -> dict:
        """What, beside the JSON, rebuilds this tokenizer."""
        return {"model_max_length": self.model_max_length, "pad_id": self.pad_id, "pad_token": self.pad_token}

    def to_str(self) -> str:
        return self._json

    def _padded(self, length: int):
        """A copy of the tokenizer that truncates and pads to ``length`` (one per length: its state is its own)."""
        if length not in self._fixed:
            from tokenizers import Tokenizer

            fixed = Tokenizer.from_str(self._json)
            fixed.enable_truncation(length)
            fixed.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.pad_token, length=length)
            self._fixed[length] = fixed
        return self._fixed[length]

    def __call__(self, prompts: list[str], padding="max_length", max_length: int | None = None,
                 truncation: bool = True, return_tensors: str | None = None):  # fmt: skip
        if padding == "max_length" and truncation:
            encodings = self._padded(max_length or self.model_max_length).encode_batch(prompts)
        elif not padding and not truncation:
            encodings = self._plain.encode_batch(prompts)
        else:
            raise ValueError(f"SavedTokenizer pads to max_length with truncation, or neither; got padding={padding!r}, "
                             f"truncation={truncation!r}")  # fmt: skip
        ids = [e.ids for e in encodings]
        return _Batch(torch.tensor(ids, dtype=torch.int64) if return_tensors == "pt" else ids)


class _Batch:
    """The part of transformers' ``BatchEncoding`` the pipeline reads."""

    def __init__(self, input_ids):
        self.input_ids = input_ids
