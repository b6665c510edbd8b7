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
        (["classifier", "--vae", "x"], "--vae applies to fashion and fashion-flow"),
        (["fashion-lcm", "--teacher", "x", "--size", "tiny"], "--size does not apply"),
        (["vae", "--steps", "0"], "steps must be a positive integer"),
        (["vae", "--device", "tpu"], "device must be"),
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
