"""Deployed exports (diffrt.models.deployment): a folder ``diffrt export`` wrote runs on its own, without diffusers,
transformers or the torch modules, with the images of the torch backend; a tampered, newer or incomplete
folder is refused in one clear error before anything is loaded."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffrt
from diffrt.core import text
from diffrt.core.files import atomic_write_json
from diffrt.models import artifacts, deployment

PROMPTS = ["a red sneaker", "a coat"]
KW = dict(steps=3, seed=[0, 1], output_type="np")

RUN_ALONE = """
import sys
for name in ("diffusers", "transformers"):
    sys.modules[name] = None  # importing either now fails
import numpy as np
import diffrt
pipe = diffrt.load(sys.argv[1], backend="onnxruntime", device="cpu")
np.save(sys.argv[2], pipe({prompts!r}, steps=3, seed=[0, 1], output_type="np"))
print(pipe.components.unet, pipe.components.tokenizers[0].__class__.__name__)
"""


@pytest.fixture
def deployed(fp32_export, tmp_path):
    """A private copy of the tiny preset's fp32 export, free to tamper with."""
    folder, _ = fp32_export
    copy = tmp_path / "deployed"
    shutil.copytree(folder, copy)
    return copy


def test_the_export_carries_its_deployment(fp32_export):
    folder, manifest = fp32_export
    record = manifest["deployment"]
    assert record["format"] == deployment.FORMAT
    assert {r["file"] for r in record["files"]} == {"deployment.json", "tokenizer_0.json"}
    assert artifacts.verify_files(folder, record["files"]) is None


def test_a_deployed_folder_runs_without_diffusers_or_transformers(tiny, deployed, tmp_path):
    out = tmp_path / "images.npy"
    code = RUN_ALONE.format(prompts=PROMPTS)
    proc = subprocess.run([sys.executable, "-c", code, str(deployed), str(out)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ModuleFacts(UNet2DConditionModel) SavedTokenizer" in proc.stdout
    images = np.load(out)
    reference = tiny(PROMPTS, **KW)
    assert images.shape == reference.shape
    assert np.abs(images - reference).max() <= 1 / 255  # the ONNX graphs' tolerance against torch


def test_in_process_it_matches_the_torch_backend_and_knows_the_model(tiny, deployed):
    pipe = diffrt.load(deployed, backend="onnxruntime", device="cpu")
    assert pipe.components.deployed["kind"] == "onnx" and pipe.dtype == torch.float32
    assert pipe.defaults == tiny.defaults and pipe.rules == tiny.rules
    assert pipe.components.random_weights  # the preset's random weights are still said in the repr
    assert np.abs(pipe(PROMPTS, guidance=4.0, **KW) - tiny(PROMPTS, guidance=4.0, **KW)).max() <= 1 / 255


@pytest.mark.parametrize("prompts", [
    ["a shirt", "", "  spaces\tand\nlines  "],
    ["a prompt far longer than any text encoder's context " * 12, "ünïcödé 日本語 — 🙂", "[PAD] </s> <|endoftext|>"],
])  # fmt: skip
def test_saved_tokenizers_give_the_ids_of_transformers(prompts):
    from diffrt.models import minilm

    _, bert = minilm.load_text_encoder()
    for tokenizer, length in ((bert, None), (text.character_clip_tokenizer(), None),
                              (text.character_t5_tokenizer(), 77), (text.character_t5_tokenizer(), 5)):  # fmt: skip
        saved = text.SavedTokenizer.from_transformers(tokenizer)
        expected = text.tokenize(tokenizer, prompts, length, warn=False)
        assert torch.equal(text.tokenize(saved, prompts, length, warn=False), expected), type(tokenizer).__name__
        unpadded = saved(prompts, padding=False, truncation=False).input_ids
        assert unpadded == tokenizer(prompts, padding=False, truncation=False).input_ids


def test_consistency_grids_are_tabulated_for_every_step_count():
    """fashion-lcm samples on LCMScheduler's own timesteps: the deployment holds them for 1..50 steps, equal
    to what from_diffusers reads off diffusers' scheduler."""
    from diffrt import samplers

    components = diffrt.load("fashion-lcm", device="cpu").components
    record = deployment.scheduler_record(components)
    saved = deployment.SavedScheduler(record["class"], record["config"], record["alphas_cumprod"], record["grids"],
                                      record["sampler"])  # fmt: skip
    assert torch.equal(saved.alphas_cumprod, components.scheduler.alphas_cumprod)
    limit = components.scheduler.config.original_inference_steps
    assert sorted(int(k) for k in record["grids"]) == list(range(1, limit + 1))
    for steps in (1, 2, 4, 7, limit):
        expected = samplers.from_diffusers(components.scheduler, steps)
        name, grid, options = saved.tabulated(steps)
        assert (name, options) == (expected[0], expected[2]) == ("lcm", {})
        for field in ("alphas", "sigmas", "timesteps"):
            assert torch.equal(getattr(grid, field), getattr(expected[1], field)), (steps, field)
        assert (grid.init_scale, grid.kind) == (expected[1].init_scale, expected[1].kind)
    assert saved.tabulated(limit + 1) is None  # not tabulated: from_diffusers rebuilds the scheduler


def test_a_plain_folder_deploys_with_its_schedulers_sampling(tmp_path):
    """A published-style folder (no diffrt.json) samples with its own scheduler by default; its deployment
    keeps that (the sampler and grids from_diffusers gave, JSON options included) and runs without diffusers."""
    from diffrt.export import export_onnx
    from tests.pipeline.plain_folders import build

    folder = build("sd-dpmpp-2m-karras", tmp_path / "plain")
    ours = diffrt.load(folder, device="cpu")
    export_onnx(ours, tmp_path / "deployed", precision="fp32")
    record = json.loads((tmp_path / "deployed" / "deployment.json").read_text())
    assert record["defaults"]["sampler"] == "scheduler" and record["scheduler"]["sampler"]["name"] == "dpmpp_2m"
    assert len(record["scheduler"]["grids"]) == deployment.TABULATED_STEPS
    out = tmp_path / "images.npy"
    proc = subprocess.run([sys.executable, "-c", RUN_ALONE.format(prompts=PROMPTS), str(tmp_path / "deployed"),
                           str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.abs(np.load(out) - ours(PROMPTS, **KW)).max() <= 1 / 255


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    atomic_write_json(folder / "manifest.json", manifest)


@pytest.mark.parametrize("damage, message", [
    (lambda f: _flip_a_byte(f / "tokenizer_0.json"), "tokenizer_0.json does not match the SHA-256 in its manifest"),
    (lambda f: (f / "tokenizer_0.json").unlink(), "tokenizer_0.json is missing"),
    (lambda f: _flip_a_byte(f / "deployment.json"), "deployment.json does not match the SHA-256"),
    (lambda f: _flip_a_byte(f / "unet.onnx"), "refusing to load the 'unet' graph"),
    (lambda f: _edit_manifest(f, lambda m: m["deployment"].update(format=deployment.FORMAT + 1, diffrt="9.0")),
     f"deployed by diffrt 9.0 \\(deployment format {deployment.FORMAT + 1}\\).*upgrade diffrt"),
    (lambda f: _edit_manifest(f, lambda m: m.update(format=artifacts.EXPORT_FORMAT + 1)),
     f"export format {artifacts.EXPORT_FORMAT + 1}.*upgrade diffrt"),
    (lambda f: _edit_manifest(f, lambda m: m.pop("deployment")), "no deployment record"),
    (lambda f: _edit_manifest(f, lambda m: m["deployment"]["files"].pop(0)), r"tokenizer file\(s\)"),
])  # fmt: skip
def test_a_damaged_or_newer_folder_is_refused_before_loading(deployed, damage, message):
    damage(deployed)
    with pytest.raises(artifacts.ArtifactError, match=message):
        diffrt.load(deployed, backend="onnxruntime", device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="torch"), "deployed onnx export \\(no torch modules\\): it runs on backend 'onnxruntime', not "
                            "'torch'"),
    (dict(backend="onnxruntime", dtype="float16"), "holds fp32 graphs: load it with dtype float32"),
    (dict(backend="onnxruntime", onnx_dir="elsewhere"), "its graphs are its own, so onnx_dir cannot be given"),
])  # fmt: skip
def test_wrong_backend_precision_or_options_are_clear_errors(deployed, kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffrt.load(deployed, device="cpu", **kwargs)


def test_the_cli_generates_from_a_deployed_folder(deployed, tmp_path):
    from diffrt.cli import main

    out = tmp_path / "coat.png"
    assert main(["generate", "--model", str(deployed), "--backend", "onnxruntime", "--steps", "2", "a coat",
                 "-o", str(out)]) == 0  # fmt: skip
    assert out.is_file()


def _swap_graphs(folder):
    """vae_decoder.onnx replaced by the text encoder's file, its manifest record (hashes, sizes) updated to
    match: every hash checks out, the graph is not the one its name says."""
    import shutil

    shutil.copyfile(folder / "text_encoder.onnx", folder / "vae_decoder.onnx")
    _edit_manifest(folder, lambda m: m["graphs"]["vae_decoder"].update(
        onnx=artifacts.file_record(folder / "vae_decoder.onnx")))


@pytest.mark.parametrize("damage, message", [
    (lambda f: _edit_manifest(f, lambda m: m.update(graphs=list(m["graphs"]))),
     "'graphs' must be an object, got a list"),
    (lambda f: _edit_manifest(f, lambda m: m.pop("model")), "manifest.json has no 'model' field"),
    (lambda f: _edit_manifest(f, lambda m: m["graphs"]["unet"]["onnx"].update(bytes="12")),
     "graphs.unet.onnx: 'bytes' must be an integer, got a string"),
    (lambda f: _edit_manifest(f, lambda m: m["graphs"]["unet"]["onnx"].update(file="../unet.onnx")),
     "is not a file name"),
    (lambda f: _edit_manifest(f, lambda m: m["deployment"].update(files={"a": 1})),
     "deployment: 'files' must be a list, got an object"),
    (_swap_graphs, r"vae_decoder.onnx has inputs input_ids \(2-d int64\); the vae_decoder graph has latent \(4-d "
                   r"float32\): the file of another graph\?"),
])  # fmt: skip
def test_a_malformed_manifest_or_a_swapped_graph_is_one_clear_error(deployed, damage, message, tmp_path):
    """Each record's fields are checked with the file and the field named; a loaded graph's inputs and outputs
    are compared with its spec before its first run. Through the CLI too: one line, exit status 2."""
    from diffrt.cli import main

    damage(deployed)
    with pytest.raises(artifacts.ArtifactError, match=message):
        pipe = diffrt.load(deployed, backend="onnxruntime", device="cpu")
        pipe("a coat", steps=1)
    assert main(["generate", "a coat", "--model", str(deployed), "--backend", "onnxruntime", "--steps", "1",
                 "-o", str(tmp_path / "x.png")]) == 2  # fmt: skip
