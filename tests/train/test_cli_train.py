"""`diffrt train`: argument checks (one-line errors, exit 2) and one real smoke run."""

import json

import pytest

from diffrt.cli import main

from .conftest import IMAGES, needs_dataset


@pytest.mark.parametrize(
    "args, message",
    [
        (["fashion"], "--vae DIR"),
        (["fashion-lcm"], "--teacher DIR"),
        (["vae", "--teacher", "x"], "--teacher applies to fashion-lcm"),
        (["fashion", "--vae", "x", "--cond-init", "random"], "--cond-init applies to fashion-lcm"),
        (["classifier", "--vae", "x"], "--vae applies to fashion and fashion-flow"),
        (["fashion-lcm", "--teacher", "x", "--size", "tiny"], "--size does not apply"),
        (["vae", "--steps", "0"], "steps must be a positive integer"),
        (["vae", "--device", "tpu"], "device must be"),
        (["vae", "--init", "x"], "--init applies to fashion and fashion-flow"),
        (["fashion", "--vae", "x", "--high-t-share", "1.5"], "0 <= high_t_share <= 1"),
        (["fashion", "--vae", "x", "--beta-schedule", "cosine"], "beta_schedule must be one of"),
        (["fashion-flow", "--vae", "x", "--beta-schedule", "linear"], "--beta-schedule applies to fashion"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    assert main(["train", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffrt: error:") and message in err and "\n" not in err


def test_unknown_kind_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["train", "unet", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


@needs_dataset
def test_train_classifier_smoke_run(tmp_path, capsys):
    out = tmp_path / "clf"
    code = main(
        [
            "train",
            "classifier",
            "--out",
            str(out),
            "--size",
            "tiny",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--data-limit",
            str(IMAGES),
            "--seed",
            "7",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and '"test_accuracy"' in printed
    settings = json.loads((out / "train.json").read_text())["settings"]
    assert settings["seed"] == 7 and settings["steps"] == 3 and settings["size"] == "tiny"
    assert (out / "model.safetensors").is_file() and (out / "reference-test.safetensors").is_file()


def test_high_t_share_oversamples_high_timesteps():
    import torch

    from diffrt.train.diffusion import sample_eps_t

    generator = torch.Generator().manual_seed(0)
    plain = sample_eps_t(20000, 1000, 0.0, 600, generator)
    mixed = sample_eps_t(20000, 1000, 0.5, 600, generator)
    assert plain.min() >= 0 and plain.max() < 1000 and mixed.min() >= 0 and mixed.max() < 1000
    assert abs(float((plain >= 600).float().mean()) - 0.4) < 0.02
    assert abs(float((mixed >= 600).float().mean()) - 0.7) < 0.02  # 0.5 + 0.5 * 0.4


@needs_dataset
def test_init_continues_from_a_trained_unet(tmp_path, eps_run, flow_run):
    import torch

    from diffrt.train import DiffusionSettings, train_eps, train_flow

    from .conftest import smoke

    settings = smoke(DiffusionSettings(vae=str(eps_run.folder / "vae")), init=str(eps_run.folder), steps=2,
                     lr=1e-12, ema_decay=0.0)  # fmt: skip
    result = train_eps(tmp_path / "continued", settings, progress=False)
    import diffrt

    before = diffrt.load(eps_run.folder, device="cpu").components.unet.state_dict()
    after = diffrt.load(result.folder, device="cpu").components.unet.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # started from it
    with pytest.raises(ValueError, match="holds an eps model, which cannot start a 'flow' model"):
        train_flow(tmp_path / "x", smoke(DiffusionSettings(vae=str(eps_run.folder / "vae")), init=str(eps_run.folder)))
