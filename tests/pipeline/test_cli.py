"""`diffrt generate` and `diffrt samplers` from the command line (in-process, through cli.main)."""

import pytest
from PIL import Image

from diffrt.cli import main


def test_generate_writes_a_grid_png_and_prints_stage_times(tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "a red sneaker", "--model", "tiny", "--steps", "3", "--sampler", "dpmpp_2m",
                 "--guidance", "5", "--seed", "0", "-n", "4", "-o", str(out)])  # fmt: skip
    assert code == 0
    image = Image.open(out)
    assert image.size == (128, 128)  # 2 x 2 grid of 64 x 64
    printed = capsys.readouterr().out
    for stage in ("text encoding", "denoising", "vae decode", "total", "seeds [0, 1, 2, 3]"):
        assert stage in printed
    assert "sampler dpmpp_2m, 3 steps, guidance 5 (from the call)" in printed


def test_generate_says_where_the_defaults_came_from(tmp_path, capsys):
    from .plain_folders import build

    folder = build("sd15-pndm", tmp_path / "sd15")
    code = main(["generate", "a coat", "--model", str(folder), "--steps", "3", "-o", str(tmp_path / "o.png")])
    assert code == 0
    assert ("sampler pndm (from the folder's PNDMScheduler); 3 steps (from the call); guidance 7.5 (from the "
            "folder's StableDiffusionPipeline)") in capsys.readouterr().out  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--sampler", "plms"], "unknown sampler 'plms'"),
        (["--model", "/no/such/folder"], "neither an embedded model"),
        (["--image", "/no/such.png"], "no such file"),
        (["--backend", "compile:aot=maybe"], "aot must be True or False, got 'maybe'"),
        (["--backend", "torch:aot=true"], "option(s) ['aot'] do not apply to the torch backend"),
        (["--backend", "compile:aot"], "backend option 'aot' in 'compile:aot' must be key=value"),
    ],
)
def test_generate_errors_are_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    code = main(["generate", "x", "--model", "tiny", "-o", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_samplers_lists_every_sampler(capsys):
    from diffrt.samplers import available

    assert main(["samplers"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in available())
    assert "scheduler" in printed
