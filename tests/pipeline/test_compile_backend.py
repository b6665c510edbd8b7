"""backend="compile": torch.compile'd U-Net and VAE decoder give the eager backend's images."""

import logging

import pytest
import torch

import diffrt


def test_compiled_pipeline_matches_eager(caplog):
    eager = diffrt.load("tiny", device="cpu")
    compiled = diffrt.load("tiny", device="cpu", backend="compile")
    options = dict(steps=2, sampler="dpmpp_2m", guidance=5.0, seed=3, output_type="pt", progress=False)
    with caplog.at_level(logging.INFO, logger="diffrt"):
        ours = compiled("a red sneaker", **options)
        compiled("a red sneaker", **options)  # same shapes: nothing new to compile, nothing said
    torch.testing.assert_close(ours, eager("a red sneaker", **options), rtol=1e-4, atol=1e-4)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling")]
    assert [line.split(" with")[0] for line in said] == ["compiling unet", "compiling vae_decoder"]


def test_step_cache_passes_are_compiled_once_and_match_eager(caplog):
    eager = diffrt.load("tiny", device="cpu")
    compiled = diffrt.load("tiny", device="cpu", backend="compile")
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
