"""The hostile-input classes, each through the command line: exit status 2 and one line naming what was
wrong, never a traceback. (The Python API's side: tests/pipeline/test_bad_input.py and test_memory.py.)"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffrt.cli import main

BLOCK = "import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
CALL = "from diffrt.cli import main\nsys.exit(main({argv!r}))\n"


def diffrt(*argv, blocked=(), cwd=None, timeout=300):
    """Run ``diffrt ARGV``: in a new process when ``blocked`` modules must be unimportable there, else in this
    one, through the same ``main`` (a fresh process adds only its imports: about 12 s a run on 2 cores)."""
    if blocked:
        code = "import sys\n" + BLOCK.format(blocked=list(blocked)) + CALL.format(argv=list(argv))
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else 0
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *fragments):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in err and err.count("diffrt: error:") == 1, err
    line = err.splitlines()[-1]  # warnings may come first; the error is one line
    assert line.startswith("diffrt: error:"), err
    for fragment in fragments:
        assert fragment in line, (fragment, line)


# 1. accepted but silently wrong: refused naming the bound ------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--height", "0"], ["height must be a multiple of 4 and at least 16, got 0"]),
        (["--width", "-32"], ["width must be", "got -32"]),
        (["--guidance", "1e6"], ["guidance must be a number in [0, 100], got 1000000.0"]),
        (["--guidance", "nan"], ["guidance must be"]),
        (["--model", "fashion-lcm", "--steps", "1000"], ["steps must be at most 50", "got 1000"]),
        (["-n", "0"], ["num_images"]),
        (["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    ],
)
def test_values_that_cannot_give_a_sensible_image_are_refused(tmp_path, args, fragments):
    assert_one_line_error(diffrt("generate", "a coat", "-o", str(tmp_path / "o.png"), *args), *fragments)
    assert not (tmp_path / "o.png").exists()


def test_a_non_finite_image_is_never_written(tmp_path, tiny_folder):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_folder, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    state = load_file(weights)
    bias = next(k for k in state if k.endswith("conv_out.bias"))
    state[bias] = torch.full_like(state[bias], float("nan"))  # a model whose output is NaN
    save_file(state, weights)
    proc = diffrt("generate", "x", "--model", str(folder), "--steps", "2", "-o", str(tmp_path / "o.png"))
    assert_one_line_error(proc, "came out non-finite (NaN or inf)", "guidance")
    assert not (tmp_path / "o.png").exists()


# 2. unbounded work: refused before any work, with the estimate -------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--height", "100000"], ["32x100000 is 3125x the area this model was trained at", "GiB"]),
        (["--height", "2048", "--width", "2048"], ["4096x the area"]),
        (["-n", "100000", "--batch-size", "100000", "-o", "many/"], ["need about", "GiB", "a smaller batch_size"]),
        (["-n", "65"], ["-n 65 is too many images for one grid file", "(at most 64)", "-o out/"]),
    ],
)
def test_unbounded_work_is_refused_up_front(tmp_path, args, fragments):
    assert_one_line_error(diffrt("generate", "a coat", *args, cwd=tmp_path), *fragments)
    assert list(tmp_path.iterdir()) == []


# 3. where outputs go: checked before the work, OS errors as one line -------------------------------------------
def _outputs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    return a_file, full


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["generate", "x", "-o", "/proc/x.png"], ["cannot write -o /proc/x.png: /proc is not writable"]),
        (["generate", "x", "-o", "/sys/x/"], ["cannot write -o folder /sys/x: /sys is not writable"]),
        (["generate", "x", "-o", "{a_file}/x.png"], ["{a_file} is a file, not a folder"]),
        (["generate", "x", "-o", "{full}"], []),  # an existing folder is a folder output: allowed, see below
        (["models", "export", "fashion", "{full}"], ["output folder {full} already exists"]),
        (["models", "export", "fashion", "{a_file}/m"], ["{a_file} is a file, not a folder"]),
        (["bench", "latency", "--model", "tiny", "--out", "/proc/l.json"], ["cannot write --out /proc/l.json"]),
        (["bench", "report", "r.json", "-o", "{a_file}"], ["--out {a_file} is a file, not a folder"]),
        (["export", "tiny", "--out", "{a_file}/onnx"], ["{a_file} is a file, not a folder"]),
        (["train", "fashion", "--out", "/sys/t"], ["cannot write --out /sys/t"]),
    ],
)
def test_unwritable_outputs_fail_before_the_work(tmp_path, argv, fragments):
    a_file, full = _outputs(tmp_path)
    argv = [a.format(a_file=a_file, full=full) for a in argv]
    if not fragments:  # the allowed case: an existing folder takes one file per image
        proc = diffrt(*argv, "--steps", "1", "-n", "2", "--seed", "5")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sorted(p.name for p in full.glob("image_*")) == ["image_000000_seed5.png", "image_000001_seed6.png"]
        return
    assert_one_line_error(diffrt(*argv), *(f.format(a_file=a_file, full=full) for f in fragments))


# 4. malformed input files: errors name the file and what was expected ------------------------------------------
def _result(kind, metrics, settings=None):
    return {"schema": 1, "kind": kind, "settings": settings or {}, "metrics": metrics, "env": {}}


def test_malformed_files_name_the_file(tmp_path, tiny_folder):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    assert_one_line_error(diffrt("generate", "x", "--image", str(text)), f"--image {text} is not an image file")
    assert_one_line_error(diffrt("generate", "x", "--model", "tiny", "--image", str(text), "--mask", str(text)),
                          "is not an image file")  # fmt: skip
    assert_one_line_error(diffrt("generate", "x", "--image", str(tmp_path)), "no such file")  # a folder

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    (folder / "diffrt.json").write_text("[1, 2]")
    assert_one_line_error(diffrt("generate", "x", "--model", str(folder)), f"{folder}/diffrt.json must hold",
                          "got a list")  # fmt: skip
    (folder / "diffrt.json").write_text('{"steps": "many"}')
    assert_one_line_error(diffrt("generate", "x", "--model", str(folder)), "'steps' must be an integer >= 1")
    (folder / "diffrt.json").unlink()
    (folder / "model_index.json").write_text("{not json")
    assert_one_line_error(diffrt("generate", "x", "--model", str(folder)), "model_index.json is not valid JSON")


def test_malformed_result_files_name_the_file(tmp_path):
    from diffrt.core.results import SCHEMA

    files = {
        "list.json": [1, 2],
        "metrics.json": {**_result("latency", [1]), "schema": SCHEMA},
        "fields.json": {**_result("throughput", {"rows": [{"batch": 1}]}), "schema": SCHEMA},
        "baseline.json": {**_result("fid", {"fid": "low", "adherence": 0.9}), "schema": SCHEMA},
    }
    for name, payload in files.items():
        (tmp_path / name).write_text(json.dumps(payload))
    assert_one_line_error(diffrt("bench", "report", str(tmp_path / "list.json"), "-o", str(tmp_path / "r")),
                          "list.json must hold a result object", "got a list")  # fmt: skip
    assert_one_line_error(diffrt("bench", "report", str(tmp_path / "metrics.json"), "-o", str(tmp_path / "r")),
                          "'metrics' must be a JSON object, got list")  # fmt: skip
    proc = diffrt("bench", "report", str(tmp_path / "fields.json"), "-o", str(tmp_path / "r"))
    assert_one_line_error(proc, "fields.json: a 'throughput' result without the fields this report reads")
    assert not (tmp_path / "r" / "report.md").exists()  # nothing half-written
    proc = diffrt("bench", "fid", "--model", "fashion-flow", "--samples", "10", "--baseline",
                  str(tmp_path / "baseline.json"))  # fmt: skip
    assert_one_line_error(proc, "baseline.json: 'metrics' must hold finite numbers for fid, kid_mean, kid_std")


# 5. missing optional packages: named with the pip extra, before the work ----------------------------------------
@pytest.mark.parametrize(
    "argv, blocked, fragments",
    [
        (["export", "tiny", "--out", "{tmp}/onnx"], ["onnx"], ["needs onnx", "pip install 'diffrt[onnx]'"]),
        (["bench", "report", "{tmp}/r.json", "-o", "{tmp}/r"], ["matplotlib"], ["pip install 'diffrt[report]'"]),
        (["bench", "samplers", "--model", "gmm", "--out", "{tmp}/s.json"], ["scipy"], ["pip install 'diffrt[bench]'"]),
        (["generate", "x", "--model", "tiny", "--backend", "onnxruntime", "-o", "{tmp}/o.png"], ["onnxruntime"],
         ["onnxruntime package is not installed", "diffrt[onnx]"]),
    ],
)  # fmt: skip
def test_missing_optional_packages_say_what_to_install(tmp_path, argv, blocked, fragments):
    (tmp_path / "r.json").write_text(json.dumps({"schema": 1}))
    proc = diffrt(*(a.format(tmp=tmp_path) for a in argv), blocked=blocked)
    assert_one_line_error(proc, *fragments)
    if argv[0] != "generate":
        assert "preset 'tiny'" not in proc.stderr  # refused before the model was loaded


def test_every_extra_named_exists_in_pyproject():
    import tomllib

    from diffrt.core.optional import EXTRAS

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    named = {v[len("diffrt[") : -1] for v in EXTRAS.values() if v.startswith("diffrt[")}
    assert named <= set(extras["optional-dependencies"])


# 6. cryptic one-liners: diffrt's own words, before the work ----------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--seed", str(2**64)], ["seeds must be integers in [0, 2**64 - 1]", str(2**64)]),
        (["--seed", str(2**64 - 1), "-n", "2"], ["got 18446744073709551616"]),  # image 2 would be 2**64
        (["-o", "noext"], ["-o noext has no file extension: give an image file (.png"]),
        (["-o", "x.unknown"], ["has extension '.unknown'"]),
        (["-o", "shots/{k}.png"], ["may use only {i} (image index) and {seed}"]),
        (["-n", "2", "-o", "same.{}png"], ["may use only"]),
        (["-n", "2", "-o", "all_{seed}"], ["has no file extension"]),
    ],
)
def test_cryptic_failures_are_said_plainly(tmp_path, args, fragments):
    assert_one_line_error(diffrt("generate", "x", *args, cwd=tmp_path), *fragments)


# 7. integrity of the shipped weights ---------------------------------------------------------------------------
def test_a_flipped_byte_in_an_embedded_model_is_refused(tmp_path):
    from diffrt.models import embedded

    root = tmp_path / "models"
    for name in ("fashion", embedded.VAE_NAME):
        shutil.copytree(embedded.MODELS_DIR / name, root / name)
    embedded.load("fashion", root=root)  # the intact copy loads
    weights = root / "fashion" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x01  # one bit of one weight, past the header: safetensors alone would not notice
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is damaged or was changed"):
        embedded.load("fashion", root=root)
    (root / embedded.VAE_NAME / "checksums.json").unlink()
    weights.write_bytes(bytes(data[:-1000]) + bytes([data[-1000] ^ 0x01]) + bytes(data[-999:]))  # restored
    with pytest.raises(FileNotFoundError, match="has no checksums.json"):
        embedded.load("fashion", root=root)


def test_every_shipped_folder_has_checksums_that_match():
    from diffrt.core import checksums
    from diffrt.models import embedded

    for name in (*embedded.NAMES, embedded.VAE_NAME, embedded.CLASSIFIER_NAME):
        checksums.verify(embedded.MODELS_DIR / name)


# friction: version, help, grid ----------------------------------------------------------------------------------
def test_version_help_and_grid(tmp_path):
    from diffrt.core import defaults
    from diffrt.core.version import __version__

    version = subprocess.run([sys.executable, "-m", "diffrt.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"diffrt {__version__}"
    helped = subprocess.run([sys.executable, "-m", "diffrt.cli", "generate", "--help"], capture_output=True,
                            text=True).stdout  # fmt: skip
    words = " ".join(helped.split())
    for name in (*defaults.EMBEDDED_MODELS, *defaults.BACKENDS, f"default: {defaults.DEFAULT_MODEL}",
                 "default: out.png", "{seed}"):  # fmt: skip
        assert name in words, name
    proc = diffrt("generate", "a coat", "--steps", "1", "-n", "8", "-o", str(tmp_path / "g.png"))
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (4 * 32, 2 * 32)  # 4 x 2, no empty row
