"""Preset architectures: built on the meta device (no memory), their parameter counts are the published models'."""

import diffusers
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffrt.models.presets import PRESETS, names

# Parameter counts of the published checkpoints (U-Net, VAE, text encoders).
PUBLISHED = {
    "sd15": (859_520_964, 83_653_863, [123_060_480]),
    "sd21": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_counts(preset):
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**preset.unet)
        vae = diffusers.AutoencoderKL(**preset.vae)
        texts = []
        for cfg in preset.text_encoders:
            cfg = dict(cfg)
            cls = CLIPTextModelWithProjection if cfg.pop("with_projection", False) else CLIPTextModel
            texts.append(_count(cls(CLIPTextConfig(**cfg))))
    return _count(unet), _count(vae), texts


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published_models(name):
    assert _meta_counts(PRESETS[name]) == PUBLISHED[name]


def test_tiny_is_a_few_hundred_thousand_parameters():
    unet, vae, texts = _meta_counts(PRESETS["tiny"])
    assert 100_000 < unet + vae + sum(texts) < 1_000_000


def test_presets_say_their_weights_are_random():
    assert names() == ["flux-dev", "flux-schnell", "sd15", "sd21", "sd3-medium", "sd35-large", "sdxl", "tiny",
                       "tiny-flux", "tiny-sd3"]
    for preset in PRESETS.values():
        assert "random weights" in preset.notes


def test_loaded_preset_is_marked_random(tiny, caplog):
    assert tiny.components.random_weights and "RANDOM weights" in repr(tiny)


def test_building_a_preset_leaves_the_callers_random_state_alone():
    from diffrt.core.fingerprint import weights_digest
    from diffrt.models import presets

    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    first = presets.load("tiny")
    assert torch.equal(torch.random.get_rng_state(), before)
    second = presets.load("tiny")
    assert weights_digest({"unet": first.unet}) == weights_digest({"unet": second.unet})  # seeded: the same each time


def test_reduced_depth_variants_keep_the_widths_and_say_so():
    """flux-dev:blocks=2,2 keeps FLUX.1-dev's widths, heads, head dims and T5 length with 2 + 2 of its 19 + 38
    blocks (counted on the meta device); the name carries the variant into every output."""
    from diffrt.models import presets

    full, reduced = presets.resolve("flux-dev"), presets.resolve("flux-dev:blocks=2,2:text_blocks=2")
    assert reduced.name == "flux-dev:blocks=2,2:text_blocks=2" and reduced.notes.startswith("REDUCED DEPTH")
    assert {k: v for k, v in reduced.transformer.items() if k not in ("num_layers", "num_single_layers")} == {
        k: v for k, v in full.transformer.items() if k not in ("num_layers", "num_single_layers")}  # fmt: skip
    assert (reduced.transformer["num_layers"], reduced.transformer["num_single_layers"]) == (2, 2)
    t5 = reduced.text_encoders[1]
    assert (t5["d_model"], t5["num_heads"], t5["num_layers"]) == (4096, 64, 2)
    counts = presets.parameter_counts(reduced)
    assert 0.9e9 < counts["transformer"] < 1.1e9  # of FLUX.1-dev's 11.9e9
    for bad, message in (("sd15:blocks=2", "it fits whole"), ("sd3-medium:blocks=2,2", "takes 1 count"),
                         ("flux-dev:blocks=0,2", "whole numbers >= 1"), ("flux-dev:size=3", "unknown preset option")):
        with pytest.raises(ValueError, match=message):
            presets.resolve(bad)


def test_a_reduced_variant_loads_and_runs_under_its_own_name():
    import diffrt

    pipe = diffrt.load("tiny-flux:blocks=1,2", device="cpu")
    assert pipe.components.name == "tiny-flux:blocks=1,2" and "tiny-flux:blocks=1,2" in repr(pipe)
    assert len(pipe.components.transformer.single_transformer_blocks) == 2
    assert pipe("a coat", steps=1, seed=0, output_type="np").shape == (1, 64, 64, 3)
