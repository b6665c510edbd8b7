"""Textual inversion: A1111, diffusers and SDXL embedding files give diffusers' own images; bad files change
nothing."""

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffrt

KW = dict(steps=3, guidance=5.0, height=64, width=64, output_type="np")


def _diffusers(pipeline_class, folder, prompt, load):
    theirs = pipeline_class.from_pretrained(folder, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    load(theirs)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    images = theirs(prompt, latents=latents, num_inference_steps=KW["steps"], height=64, width=64,
                    guidance_scale=KW["guidance"], output_type="np").images  # fmt: skip
    return images, theirs.scheduler


def test_a1111_and_diffusers_files_match_diffusers(tiny_folder, tmp_path):
    generator = torch.Generator().manual_seed(0)
    a1111 = tmp_path / "shiny.safetensors"
    save_file({"emb_params": torch.randn(3, 32, generator=generator)}, str(a1111))  # three vectors
    learned = tmp_path / "learned"
    learned.mkdir()
    save_file({"<blue-style>": torch.randn(32, generator=generator)}, str(learned / "learned_embeds.safetensors"))
    prompt = "a shiny sneaker in <blue-style>"

    def load(theirs):
        theirs.load_textual_inversion(str(a1111), token="shiny")
        theirs.load_textual_inversion(str(learned / "learned_embeds.safetensors"))

    reference, scheduler = _diffusers(diffusers.StableDiffusionPipeline, tiny_folder, prompt, load)
    ours = diffrt.load(tiny_folder, device="cpu", dtype=torch.float32)
    plain = ours(prompt, seed=4, scheduler=scheduler, **KW)
    assert ours.load_textual_inversion(a1111) == ["shiny", "shiny_1", "shiny_2"]  # the file name is the token
    assert ours.load_textual_inversion(learned) == ["<blue-style>"]
    images = ours(prompt, seed=4, scheduler=scheduler, **KW)
    assert np.abs(images - reference).max() <= 1e-4 and np.abs(images - plain).max() > 1e-3


def test_sdxl_clip_l_and_clip_g_match_diffusers(tiny_sdxl_folder, tmp_path):
    generator = torch.Generator().manual_seed(1)
    vectors = {"clip_l": torch.randn(2, 32, generator=generator), "clip_g": torch.randn(2, 32, generator=generator)}
    path = tmp_path / "sdxl.safetensors"
    save_file(vectors, str(path))
    prompt = "a <gleam> bag"

    def load(theirs):  # diffusers' SDXL recipe: one call per text encoder
        theirs.load_textual_inversion(vectors["clip_l"], token="<gleam>", text_encoder=theirs.text_encoder,
                                      tokenizer=theirs.tokenizer)  # fmt: skip
        theirs.load_textual_inversion(vectors["clip_g"], token="<gleam>", text_encoder=theirs.text_encoder_2,
                                      tokenizer=theirs.tokenizer_2)  # fmt: skip

    reference, scheduler = _diffusers(diffusers.StableDiffusionXLPipeline, tiny_sdxl_folder, prompt, load)
    ours = diffrt.load(tiny_sdxl_folder, device="cpu", dtype=torch.float32)
    assert ours.load_textual_inversion(path, token="<gleam>") == ["<gleam>", "<gleam>_1"]
    assert np.abs(ours(prompt, seed=4, scheduler=scheduler, **KW) - reference).max() <= 1e-4


def test_bad_embeddings_fail_clearly_and_change_nothing(tmp_path):
    pipe = diffrt.load("tiny", device="cpu")
    tokenizer, encoder = pipe.components.tokenizers[0], pipe.components.text_encoders[0]
    vocab, rows = len(tokenizer), encoder.get_input_embeddings().weight.clone()
    (tmp_path / "e.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle file"):
        pipe.load_textual_inversion(tmp_path / "e.pt")
    save_file({"emb_params": torch.ones(2, 48)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"shape \(2, 48\) for text encoder 1, whose token embeddings are 32-d"):
        pipe.load_textual_inversion(tmp_path / "wide.safetensors")
    save_file({"clip_l": torch.ones(1, 32), "clip_g": torch.ones(1, 32)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match="SDXL embeddings .* 1 text encoder"):
        pipe.load_textual_inversion(tmp_path / "xl.safetensors")
    save_file({"a": torch.ones(32), "b": torch.ones(32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="no textual-inversion file"):
        pipe.load_textual_inversion(tmp_path / "two.safetensors")
    save_file({"emb_params": torch.ones(1, 32)}, str(tmp_path / "ok.safetensors"))
    with pytest.raises(ValueError, match="'a</w>' is already in the tokenizer"):
        pipe.load_textual_inversion(tmp_path / "ok.safetensors", token="a</w>")
    assert len(tokenizer) == vocab and torch.equal(encoder.get_input_embeddings().weight, rows)


def test_cli_generate_with_an_embedding(tmp_path, capsys):
    from diffrt.cli import main

    path = tmp_path / "<glow>.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(3))}, str(path))
    plain, out = tmp_path / "plain.png", tmp_path / "glow.png"
    argv = ["generate", "a <glow> boot", "--model", "tiny", "--steps", "2", "--device", "cpu"]
    assert main([*argv, "-o", str(plain)]) == 0
    assert main([*argv, "-o", str(out), "--embedding", str(path)]) == 0
    assert "tokens <glow>, <glow>_1" in capsys.readouterr().err and out.read_bytes() != plain.read_bytes()


def test_onnxruntime_grows_its_exported_token_table_as_torch_does(tmp_path):
    path = tmp_path / "<glint>.safetensors"
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(5))}, str(path))
    ours = diffrt.load("tiny", device="cpu", backend="onnxruntime", cache_dir=tmp_path / "cache")
    reference = diffrt.load("tiny", device="cpu")
    assert ours.load_textual_inversion(path) == reference.load_textual_inversion(path) == ["<glint>", "<glint>_1"]
    images, expected = ours("a <glint> coat", seed=1, **KW), reference("a <glint> coat", seed=1, **KW)
    assert np.abs(images - expected).max() <= 1 / 255
    assert np.abs(images - ours("a coat", seed=1, **KW)).max() > 1e-3
