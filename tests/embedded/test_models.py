"""The shipped embedded models: present, small, loadable by name, generating what the prompt asks for."""

import pytest
import torch

import diffrt
from diffrt.bench import quality
from diffrt.models import embedded
from diffrt.models.fashion import classifier as fashion_classifier
from diffrt.train import data


def _megabytes(names) -> float:
    files = [p for name in names for p in (embedded.MODELS_DIR / name).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def test_shipped_models_and_the_classifier_fit_in_30_mb():
    """Issue 3's budget for the embedded models; the adapters trained on them (a LoRA, a ControlNet) have their
    own, smaller one."""
    assert set(embedded.shipped()) == set(embedded.NAMES) and embedded.DEFAULT == "fashion"
    models = (*embedded.NAMES, embedded.VAE_NAME, embedded.CLASSIFIER_NAME)
    assert _megabytes(models) < 30, f"{_megabytes(models):.1f} MB"
    assert _megabytes(embedded.ADAPTERS) < 4, f"{_megabytes(embedded.ADAPTERS):.1f} MB"
    shipped = {p.name for p in embedded.MODELS_DIR.iterdir() if p.is_dir()}
    assert shipped == {*models, *embedded.ADAPTERS}  # nothing in the package outside both budgets
    for name in (*embedded.shipped(), embedded.VAE_NAME, embedded.CLASSIFIER_NAME, *embedded.ADAPTERS):
        card = (embedded.MODELS_DIR / name / "README.md").read_text()
        assert "Not measured yet" not in card and "## Training" in card


def test_classifier_meets_its_accuracy_target():
    """The shipped classifier scores >= 91% on the 10k test images (measured here when the dataset is present)."""
    import json

    folder = embedded.MODELS_DIR / embedded.CLASSIFIER_NAME
    recorded = json.loads((folder / "config.json").read_text())["test_accuracy"]
    assert recorded >= 0.91
    if data.dataset_available():
        from diffrt.train.classifier import accuracy

        measured = accuracy(fashion_classifier.load_classifier(), data.load_split("test"), torch.device("cpu"))
        assert measured == pytest.approx(recorded, abs=2e-3)


@pytest.mark.parametrize("name", embedded.NAMES)
def test_shipped_model_draws_what_the_prompt_asks_for(name):
    """50 images, five per class prompt, at the model's own settings (the default `fashion`: 20 dpmpp_2m steps;
    fashion-lcm: 4 lcm steps): the classifier agrees with the prompt for at least 80% of them."""
    pipe = diffrt.load(name, device="cpu")
    prompts = [data.class_prompt(k) for k in range(10) for _ in range(5)]
    images = pipe(prompts, seed=list(range(50)), output_type="pt", progress=False)
    assert images.shape == (50, 3, 32, 32) and torch.isfinite(images).all()
    labels = torch.arange(10).repeat_interleave(5)
    assert quality.adherence(images.float(), labels) >= 0.8


@pytest.mark.parametrize("name", ["fashion", "fashion-flow", "fashion-lcm"])
def test_shipped_models_generate_at_their_defaults(name):
    pipe = diffrt.load(name, device="cpu")
    images = pipe(["an ankle boot", "a bag"], seed=[0, 1], output_type="pt", progress=False)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    expected = {"fashion": "dpmpp_2m", "fashion-flow": "euler", "fashion-lcm": "lcm"}[name]
    assert pipe.components.defaults["sampler"] == expected


def test_generate_cli_uses_the_default_model(tmp_path, capsys):
    from PIL import Image

    from diffrt.cli import main

    out = tmp_path / "boot.png"
    assert main(["generate", "an ankle boot", "-o", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (32, 32)


def test_sampler_sweep_on_a_trained_model_and_its_report(tmp_path, capsys):
    import json

    from diffrt.bench.report import write_report
    from diffrt.cli import main

    out = tmp_path / "sweep.json"
    argv = ["bench", "samplers", "--model", "fashion-flow", "--samplers", "euler,heun", "--steps", "1,2",
            "--samples", "20", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "samplers-model" and record["settings"]["model_kind"] == "flow"
    curve = record["metrics"]["curves"]["euler"]
    assert curve["steps"] == [1, 2] and curve["nfe"] == [1, 2]
    assert record["metrics"]["curves"]["heun"]["nfe"] == [1, 3]  # the last step to sigma 0 is one call
    assert all(0 <= a <= 1 for a in curve["adherence"]) and all(f > 0 for f in curve["fid"])
    assert "prompt adherence by steps" in capsys.readouterr().out
    md_path, _ = write_report([out], tmp_path / "report")
    assert "| heun |" in md_path.read_text() and (tmp_path / "report" / "model-samplers-0.png").is_file()


def test_cli_defaults_name_the_default_model():
    """The CLI and `bench fid` spell the default model out (they start without importing diffrt.models.embedded)."""
    import argparse

    from diffrt import cli
    from diffrt.bench import fid

    parser = argparse.ArgumentParser()
    fid.add_arguments(parser)
    assert cli.DEFAULT_MODEL == parser.get_default("model") == embedded.DEFAULT


def test_shipped_lora_turns_the_neutral_prompt_into_dresses():
    """``fashion-lora`` (checksummed, loaded by name): 40 images of "a piece of clothing" at 8 steps, same seeds;
    the classifier calls at least 30 points more of them dresses with the adapter than without."""
    pipe = diffrt.load("fashion", device="cpu")
    options = dict(seed=list(range(40)), steps=8, output_type="pt", progress=False)
    without = quality.adherence(pipe(["a piece of clothing"] * 40, **options).float(), [3] * 40)
    pipe.load_lora("fashion-lora")
    with_lora = quality.adherence(pipe(["a piece of clothing"] * 40, **options).float(), [3] * 40)
    assert with_lora - without >= 0.3, (without, with_lora)
    card = (embedded.MODELS_DIR / "fashion-lora" / "README.md").read_text()
    assert "## Training" in card and "## Effect" in card
