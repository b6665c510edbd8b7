"""backend="compile": torch.compile'd U-Net and VAE decoder give the eager backend's images (also after a LoRA
switch, which recompiles nothing), and a second process reuses the compiled code the first saved in diffrt's cache."""

import logging
import subprocess
import sys

import pytest
import torch

import diffrt


def test_compiled_pipeline_matches_eager_and_switches_loras_without_recompiling(caplog, tmp_path):
    import torch._dynamo.utils as dynamo_utils

    from diffrt.bench.lora import random_loras

    eager = diffrt.load("tiny", device="cpu")
    compiled = diffrt.load("tiny", device="cpu", backend="compile", cache_dir=tmp_path)
    options = dict(steps=2, sampler="dpmpp_2m", guidance=5.0, seed=3, output_type="pt", progress=False)
    with caplog.at_level(logging.INFO, logger="diffrt"):
        ours = compiled("a red sneaker", **options)
        compiled("a red sneaker", **options)  # same shapes: nothing new to compile, nothing said
    torch.testing.assert_close(ours, eager("a red sneaker", **options), rtol=1e-4, atol=1e-4)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling")]
    assert [line.split(" with")[0] for line in said] == ["compiling unet", "compiling vae_decoder"]

    # LoRAs are written into the compiled modules' own parameters: switching compiles nothing new
    first, second = random_loras("tiny", 4, tmp_path, "cpu")
    frames = dict(dynamo_utils.counters["frames"])
    compiled.load_lora(first, name="a", scale=1.0)
    compiled.load_lora(second, name="b", scale=0.0)
    compiled.set_loras({"a": 0.0, "b": 0.8})
    switched = compiled("a red sneaker", **options)
    assert dict(dynamo_utils.counters["frames"]) == frames and not dynamo_utils.counters["recompiles"]
    fresh = diffrt.load("tiny", device="cpu", loras={second: 0.8})
    expected = fresh("a red sneaker", **options)
    assert (expected - ours).abs().max() > 1e-3  # the adapter does change the images
    torch.testing.assert_close(switched, expected, rtol=1e-4, atol=1e-4)


def test_step_cache_passes_are_compiled_once_and_match_eager(caplog, tmp_path):
    eager = diffrt.load("tiny", device="cpu")
    compiled = diffrt.load("tiny", device="cpu", backend="compile", cache_dir=tmp_path)
    options = dict(steps=3, sampler="euler", guidance=5.0, seed=3, output_type="latent", progress=False,
                   cache="deepcache:interval=2")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="diffrt"):
        ours = compiled.generate("a red sneaker", **options)
        compiled("a blue bag", **options)  # same shapes and schedule: nothing new to compile
    assert (ours.stages.full_calls, ours.stages.cached_calls) == (2, 1)
    torch.testing.assert_close(ours.images, eager("a red sneaker", **options), rtol=1e-4, atol=1e-4)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling the step cache")]
    assert [line.split(" of")[0] for line in said] == ["compiling the step cache's deep_full pass",
                                                       "compiling the step cache's deep_partial pass"]  # fmt: skip


def test_bad_compile_options_are_named():
    with pytest.raises(ValueError, match="compile mode must be one of"):
        diffrt.load("tiny", device="cpu", backend="compile", mode="fastest")
    with pytest.raises(ValueError, match="allowed: mode, dynamic"):
        diffrt.load("tiny", device="cpu", backend="compile", fullgraph=True)
    with pytest.raises(ValueError, match="persist must be True or False, got 'yes'"):
        diffrt.load("tiny", device="cpu", backend="compile", persist="yes")


COMPILE_ONCE = """
import sys, torch, diffrt
from torch._dynamo.utils import counters
pipe = diffrt.load("tiny", device="cpu", backend="compile", cache_dir=sys.argv[1])
torch.save(pipe("a red sneaker", steps=1, seed=0, output_type="pt", progress=False), sys.argv[2])
inductor = counters["inductor"]
print(inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"], pipe.backend.reused)
"""


@pytest.mark.slow  # two cold compiles of the tiny model in fresh processes: about 2 minutes on 2 cores
def test_a_second_process_reuses_the_saved_compiled_code(tmp_path):
    """Each process gets an empty TorchInductor cache: the second reuses what diffrt saved (the artifacts)."""
    import os

    counts = []
    for run in ("first", "second"):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{run}"))
        proc = subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(tmp_path / "cache"), str(tmp_path / run)],
                              env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts.append([int(v) for v in proc.stdout.split()[-3:]])
    (hits, misses, reused), (hits_2, misses_2, reused_2) = counts
    assert hits == 0 and misses >= 2 and reused == 0  # the U-Net and the VAE decoder compiled from scratch
    assert hits_2 >= 2 and misses_2 == 0 and reused_2 == 2  # both loaded from the two files the first saved
    assert len(list((tmp_path / "cache" / "compile").glob("tiny-*/*.bin"))) == 2
    assert torch.equal(torch.load(tmp_path / "first"), torch.load(tmp_path / "second"))


def test_inductor_caches_in_diffrts_folder_unless_told_otherwise(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "placeholder")  # restored after the test, whatever it became
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    diffrt.load("tiny", device="cpu", backend="compile", cache_dir=tmp_path)  # creating compiles nothing yet
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    diffrt.load("tiny", device="cpu", backend="compile", cache_dir=tmp_path / "other")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    diffrt.load("tiny", device="cpu", backend="compile", cache_dir=tmp_path / "off", persist=False)
    assert not (tmp_path / "off").exists()


def test_unreadable_saved_artifacts_are_skipped_with_a_warning(tmp_path, caplog):
    from diffrt.backends.compile_backend import load_artifacts

    (tmp_path / "unet-float32-1x4x8x8.bin").write_bytes(b"not torch's format")
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        assert load_artifacts(tmp_path) == 0
    assert "ignoring unreadable torch.compile artifacts" in caplog.text
