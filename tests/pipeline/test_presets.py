"""Preset architectures: built on the meta device (no memory), their parameter counts are the published models'."""

import diffusers
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffrt.presets import PRESETS, names

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
    from diffrt import presets
    from diffrt.fingerprint import weights_digest

    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    first = presets.load("tiny")
    assert torch.equal(torch.random.get_rng_state(), before)
    second = presets.load("tiny")
    assert weights_digest({"unet": first.unet}) == weights_digest({"unet": second.unet})  # seeded: the same each time
