"""Hardening, round 2, through the Python API: values checked once (numbers of any size, prompts that cannot be
encoded, pictures of more than 8 bits), work that is bounded and cancellable, adapter files checked before they
are trusted, non-finite results that name their likely cause, records checked field by field."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffrt
from diffrt.core import checks
from diffrt.models import lora
from diffrt.pipeline.pipe import Cancelled


@pytest.fixture(scope="module")
def fashion():
    return diffrt.load("fashion", device="cpu")


# 2. numbers of any form, prompts, pictures ------------------------------------------------------------------
@pytest.mark.parametrize(("options", "words"), [
    (dict(guidance=10**400), "guidance must be a number in [0, 100], got an integer of 401 digits"),
    (dict(guidance=float("nan")), "guidance must be a finite number, got nan"),
    (dict(guidance="7"), "guidance must be a number, got '7' (a string)"),
    (dict(guidance=True), "guidance must be a number, got True"),
    (dict(guidance_rescale=-(10**500)), "guidance_rescale must be a number in [0, 1], got an integer of 501 digits"),
    (dict(steps=10**300), "steps must be at most 1000"),
    (dict(steps=2.0), "steps must be an integer, got 2.0"),
    (dict(seed=10**40), "seeds must be integers in [0, 2**64 - 1]"),
    (dict(num_images=10**20, seed=0), "num_images must be an integer in [1, 1000000]"),
    (dict(num_images=2000, seed=0), "2000 images in one call; at most 1024"),
    (dict(image=torch.rand(1, 3, 32, 32), strength=10**400), "strength must be a number in (0, 1]"),
])  # fmt: skip
def test_numbers_of_any_size_or_kind_are_refused_naming_the_bound(fashion, options, words):
    with pytest.raises(ValueError) as err:
        fashion.check("a coat", **options)
    assert words in str(err.value)


@pytest.mark.parametrize("prompt", ["a \ud800 coat", "caf\udce9", ["a coat", "\udfff"], "x" * 20_001])
def test_prompts_that_cannot_be_encoded_or_are_huge_are_refused_before_any_work(fashion, prompt):
    with pytest.raises(ValueError, match="cannot be encoded|characters; at most 20000"):
        fashion.check(prompt)


def test_check_runs_the_tokenizers_and_a_huge_call_is_refused_at_once(fashion):
    fashion.check(["a coat", "ünïcödé 日本語"], negative_prompt=["", "blurry"])
    with pytest.raises(ValueError, match="10000 images in one call; at most 1024 .generate_batches"):
        fashion.generate(["a coat"] * 10_000, steps=1)


def test_sixteen_bit_and_float_pictures_keep_their_range():
    """A 16-bit grey ramp used to be clipped to 8 bits by PIL's RGB conversion (150 levels became 0 and 255)."""
    from PIL import Image

    from diffrt.core.images import image_tensor, to_tensor
    from diffrt.models.control import canny

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    wide = to_tensor(Image.fromarray(ramp), "image")
    assert wide.shape == (1, 3, 64, 64) and wide.unique().numel() > 4000
    assert torch.allclose(wide[0, 0], torch.from_numpy(ramp / 65535).float(), atol=1e-6)
    assert torch.allclose(to_tensor(ramp, "image")[0, 0], wide[0, 0])  # a uint16 array reads the same
    eight = Image.fromarray((ramp / 257).round().astype(np.uint8))
    assert np.array_equal(np.asarray(canny(Image.fromarray(ramp))), np.asarray(canny(eight)))
    steps = Image.fromarray(np.kron(np.arange(4, dtype=np.uint16).reshape(2, 2) * 20000, np.ones((32, 32), np.uint16)))
    assert np.asarray(canny(steps)).any()  # the 16-bit steps are edges, as their 8-bit copy's are
    assert image_tensor(Image.fromarray(ramp), 1).min() == -1
    with pytest.raises(ValueError, match="F image with values 0 to 2; diffrt reads F pictures as 0 to 1"):
        to_tensor(Image.fromarray(np.linspace(0, 2, 64, dtype=np.float32).reshape(8, 8)), "image")


# 3. bounded and cancellable work ----------------------------------------------------------------------------
def test_a_call_stops_between_steps_when_cancelled(fashion):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled, match="cancelled after 2 of 20 denoiser calls"):
        fashion.generate("a coat", steps=20, seed=0, cancel=cancel)
    with pytest.raises(Cancelled, match="before denoising"):
        fashion.generate("a coat", steps=20, seed=0, cancel=lambda: True)
    with pytest.raises(ValueError, match="cancel must be a callable"):
        fashion.generate("a coat", steps=1, cancel=True)
    assert fashion("a coat", steps=2, seed=0, cancel=lambda: False)  # never cancelled: a normal call
    batches = fashion.generate_batches("a coat", num_images=4, batch_size=2, steps=2, cancel=lambda: True)
    with pytest.raises(Cancelled):
        next(batches)


# 4. adapter files ---------------------------------------------------------------------------------------------
def _lora_file(path, fashion, rank=2, value=0.01, metadata=None, **changes):
    unet = fashion.components.unet
    name, layer = next((n, m) for n, m in unet.named_modules() if n.endswith("to_q"))
    tensors = {f"unet.{name}.lora_A.weight": torch.full((rank, layer.in_features), value),
               f"unet.{name}.lora_B.weight": torch.full((layer.out_features, rank), value)}  # fmt: skip
    tensors.update(changes)
    save_file(tensors, str(path), metadata=metadata)
    return path, f"unet.{name}"


@pytest.mark.parametrize(("make", "words"), [
    (lambda p, f: _lora_file(p, f, value=float("nan")), "holds NaN or inf values"),
    (lambda p, f: _lora_file(p, f, value=float("inf")), "holds NaN or inf values"),
    (lambda p, f: _lora_file(p, f, rank=0), "a LoRA factor is a non-empty"),
    (lambda p, f: _lora_file(p, f, metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "abc"})}),
     "lora_adapter_metadata unet.lora_alpha must be a number, got 'abc'"),
    (lambda p, f: _lora_file(p, f, metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 1e300})}),
     "lora_alpha must be a number in (0, 65536]"),
    (lambda p, f: _lora_file(p, f, metadata={"lora_adapter_metadata": '{"unet.lora_alpha": NaN}'}),
     "lora_alpha must be a finite number"),
    (lambda p, f: _lora_file(p, f, metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": [8]})}),
     "lora_alpha must be a number, got [8] (list)"),
    (lambda p, f: _lora_file(p, f, metadata={"lora_adapter_metadata": json.dumps([1, 2])}),
     "lora_adapter_metadata must be a JSON object, got list"),
    (lambda p, f: _lora_file(p, f, metadata={"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": ["x"]})}),
     "alpha_pattern must be an object"),
    (lambda p, f: _lora_file(p, f, metadata={"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": {"(": 4}})}),
     "is not a valid pattern"),
    (lambda p, f: _lora_file(p, f, metadata={"lora_adapter_metadata": json.dumps({"unet.use_rslora": "yes"})}),
     "use_rslora must be true or false"),
])  # fmt: skip
def test_a_bad_lora_file_is_refused_naming_it_and_nothing_changes(fashion, tmp_path, make, words):
    path, _ = make(tmp_path / "bad.safetensors", fashion)
    before = {k: v.clone() for k, v in fashion.components.unet.state_dict().items()}
    with pytest.raises(lora.LoraError) as err:
        fashion.load_lora(path)
    assert words in str(err.value) and str(path) in str(err.value)
    assert all(torch.equal(v, fashion.components.unet.state_dict()[k]) for k, v in before.items())
    assert not fashion.loras


@pytest.mark.parametrize("scale", [10**400, float("inf"), 1e6, "1", None])
def test_lora_scales_are_numbers_in_bounds(fashion, scale):
    with pytest.raises(lora.LoraError, match="the scale of LoRA 'fashion-lora' must be"):
        fashion.load_lora("fashion-lora", scale=scale)


def test_a_non_finite_result_names_the_loaded_lora_first(tmp_path):
    pipe = diffrt.load("fashion", device="cpu")
    path, _ = _lora_file(tmp_path / "huge.safetensors", pipe, value=1e19)  # finite weights that overflow a call
    pipe.load_lora(path)
    with pytest.raises(ValueError, match=r"likely causes: the LoRA\(s\) loaded \(huge at 1\)"):
        pipe("a coat", steps=2, seed=0)


def test_a_textual_inversion_token_that_is_already_a_word_is_refused(tmp_path):
    pipe = diffrt.load("fashion", device="cpu")
    dim = pipe.components.text_encoders[0].get_input_embeddings().weight.shape[1]
    for token, words in (("Dress", "as 'dress'"), ("DRESS", "as 'dress'"), ("ankle", ""), (" ", "")):  # BERT lowercases
        save_file({token: torch.zeros(1, dim)}, str(tmp_path / "word.safetensors"))
        taken = "is blank" if token == " " else f"{token!r} is already in the tokenizer of text encoder 1.*{words}"
        with pytest.raises(ValueError, match=taken):
            pipe.load_textual_inversion(tmp_path / "word.safetensors")
    save_file({"<sks>": torch.full((1, dim), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="must be finite floats"):
        pipe.load_textual_inversion(tmp_path / "nan.safetensors")
    save_file({"<sks>": torch.zeros(1, dim)}, str(tmp_path / "ok.safetensors"))
    assert pipe.load_textual_inversion(tmp_path / "ok.safetensors") == ["<sks>"]


# 5. records checked field by field ----------------------------------------------------------------------------
def test_checks_fields_names_the_file_and_the_field():
    spec = {"graphs": dict, "model": dict, "data": (dict, type(None))}
    for record, words in (([1, 2], "must be a JSON object, got a list"), ({"graphs": []}, "'graphs' must be an object"),
                          ({"graphs": {}}, "has no 'model' field"), (None, "got null"),
                          ({"graphs": {}, "model": {}, "data": 3}, "'data' must be an object or null")):  # fmt: skip
        with pytest.raises(ValueError, match="m.json") as err:
            checks.fields(record, spec, "m.json")
        assert words in str(err.value)


def test_temporaries_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from diffrt.core.files import TEMP_PREFIX, clean_leftovers, temp_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"{TEMP_PREFIX}{dead.stdout.strip()}-compiling-abc").mkdir()  # a killed AOT compile's scratch
    (tmp_path / f"{TEMP_PREFIX}old-name").write_text("x")  # no pid: an older writer's
    (tmp_path / f"{temp_prefix('mine.json.')}123").write_text("x")  # this process's, still writing
    assert clean_leftovers(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [f"{TEMP_PREFIX}{os.getpid()}-mine.json.123"]


def test_a_malformed_aot_package_record_is_ignored_not_trusted(tmp_path):
    from diffrt.backends import aot

    sidecar = tmp_path / "unet-abc.json"
    (tmp_path / "unet-abc.pt2").write_bytes(b"package")
    good = {"format": aot.FORMAT, "graph": "unet", "axes": {"sample": [[1, 63], 4, None, [8, None]]}}
    sidecar.write_text(json.dumps(good))
    assert aot._read_package(sidecar).axes == good["axes"]
    for record in ([1], None, {**good, "axes": [1]}, {**good, "axes": {"sample": [[1, "x"]]}}, {**good, "format": "1"},
                   {"format": aot.FORMAT, "axes": {}}):  # fmt: skip
        sidecar.write_text(json.dumps(record))
        assert aot._read_package(sidecar) is None, record
