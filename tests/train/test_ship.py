"""Shipping a trained folder into a package models folder, loading it by name, and writing it back out
as a complete diffusers folder (the smoke-run models stand in for the real ones)."""

import pytest
import torch

from diffrt.models import embedded

from .conftest import needs_dataset

pytestmark = needs_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory, eps_run, lcm_run):
    root = tmp_path_factory.mktemp("models")
    embedded.ship(eps_run.folder, "fashion", root)
    embedded.ship(lcm_run.folder, "fashion-lcm", root)
    return root


def test_shipped_folders_hold_only_their_own_parts_in_float16(root):
    assert embedded.shipped(root) == ["fashion", "fashion-lcm"]
    assert sorted(p.name for p in (root / "fashion").iterdir()) == [
        "README.md", "checksums.json", "diffrt.json", "scheduler", "train.json", "unet"]  # fmt: skip
    from diffrt.core import checksums

    for name in ("fashion", "fashion-lcm", embedded.VAE_NAME):  # ship wrote the sums of what it shipped
        checksums.verify(root / name)
    from safetensors import safe_open

    with safe_open(root / "fashion" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert (root / embedded.VAE_NAME / "config.json").is_file()


def test_embedded_model_generates_like_its_training_folder(root, eps_run):
    import diffrt
    from diffrt.models.loading import load_components

    shipped = embedded.load("fashion", root=root)
    original = load_components(eps_run.folder, dtype=torch.float32)
    assert shipped.defaults == original.defaults
    assert type(shipped.scheduler) is type(original.scheduler)
    ours = diffrt.load(eps_run.folder, device="cpu")("an ankle boot", steps=4, seed=1, output_type="pt")
    theirs = pipeline_of(shipped)("an ankle boot", steps=4, seed=1, output_type="pt")
    # float16 storage of the U-Net and VAE is the only difference
    assert (ours - theirs).abs().max() < 0.05


def pipeline_of(components):
    from diffrt import backends
    from diffrt.pipeline.pipe import Pipeline

    cpu = torch.device("cpu")
    return Pipeline(components, backends.create("torch", components, cpu, torch.float32), cpu, torch.float32)


def test_materialized_folder_runs_in_diffusers(root, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = embedded.materialize("fashion", tmp_path / "fashion", root=root)
    image = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)(
        "an ankle boot", num_inference_steps=2, output_type="np"
    ).images
    assert image.shape == (1, 32, 32, 3)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        embedded.materialize("fashion", out, root=root)


def test_unknown_and_missing_models_are_clear(root, tmp_path):
    with pytest.raises(ValueError, match="unknown embedded model 'sneaker'"):
        embedded.folder("sneaker", root)
    with pytest.raises(FileNotFoundError, match="'fashion-flow' is not in this installation"):
        embedded.load("fashion-flow", root=root)


def test_a_unet_trained_on_another_vae_is_refused(root, eps_run, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    other = tmp_path / "other"
    shutil.copytree(eps_run.folder, other)
    vae = AutoencoderKL.from_pretrained(other / "vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(1.0)
    vae.save_pretrained(other / "vae")
    with pytest.raises(ValueError, match="differs from the shipped fashion-vae"):
        embedded.ship(other, "fashion", root)
    assert (root / "fashion" / "unet").is_dir()  # the shipped model is untouched
