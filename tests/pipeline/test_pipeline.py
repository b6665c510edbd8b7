"""The pipeline end to end on the tiny preset (random weights, CPU, float32)."""

import threading

import numpy as np
import pytest
import torch

from diffrt import samplers

PROMPT = "a red sneaker"
SIZE = dict(height=64, width=64)


@pytest.mark.parametrize("name", samplers.available())
def test_every_sampler_gives_finite_images_of_the_right_size(tiny, name):
    images = tiny(PROMPT, steps=3, sampler=name, seed=1, num_images=2, output_type="np", **SIZE)
    assert images.shape == (2, 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_pil_output_and_non_square_size(tiny):
    images = tiny(PROMPT, steps=2, seed=0, height=64, width=96)
    assert len(images) == 1 and images[0].size == (96, 64)


def test_same_seed_same_images_and_seed_lists_reproduce_single_images(tiny):
    kw = dict(steps=3, sampler="euler_ancestral", output_type="pt", **SIZE)
    batch = tiny(PROMPT, seed=10, num_images=3, **kw)
    again = tiny(PROMPT, seed=10, num_images=3, **kw)
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    assert tiny.last_seeds == [10, 11, 12]
    for k in range(3):
        alone = tiny(PROMPT, seed=10 + k, **kw)
        torch.testing.assert_close(alone[0], batch[k], rtol=1e-5, atol=1e-5)
    listed = tiny(PROMPT, seed=[12, 10], num_images=2, **kw)
    torch.testing.assert_close(listed[0], batch[2], rtol=1e-5, atol=1e-5)


def test_guidance_off_skips_the_unconditional_pass(tiny):
    calls = []
    run = tiny.backend.run

    def counting(graph, **inputs):
        if graph == "unet":
            calls.append(inputs["sample"].shape[0])
        return run(graph, **inputs)

    tiny.backend.run = counting
    try:
        tiny(PROMPT, steps=2, guidance=1.0, seed=0, output_type="latent", **SIZE)
        tiny(PROMPT, steps=2, guidance=0.0, seed=0, output_type="latent", **SIZE)
        tiny(PROMPT, steps=2, guidance=4.0, seed=0, output_type="latent", **SIZE)
    finally:
        tiny.backend.run = run
    assert calls == [1, 1, 1, 1, 2, 2]


def test_stage_timings_are_recorded(tiny):
    result = tiny.generate(PROMPT, steps=3, sampler="heun", seed=0, **SIZE)
    stages = result.stages
    assert tiny.stages is stages and result.seeds == tiny.last_seeds == [0]
    assert len(stages.unet_calls_ms) == 5  # heun: 2 calls per step but the last
    assert stages.text_encode_ms > 0 and stages.vae_decode_ms > 0
    assert stages.total_ms >= stages.denoise_ms + stages.vae_decode_ms
    assert "model calls" in stages.summary()


def _picture(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 64, 64, generator=g)


def test_img2img_at_strength_one_is_text_to_image(tiny):
    kw = dict(steps=4, seed=3, output_type="pt", **SIZE)
    torch.testing.assert_close(tiny(PROMPT, image=_picture(), strength=1.0, **kw), tiny(PROMPT, **kw))


def test_img2img_at_small_strength_stays_near_the_image(tiny):
    # random weights: compare in latent space, where the encoded picture is the fixed point to stay near
    picture = _picture()
    encoded = tiny.encode_image(picture)
    kw = dict(steps=10, seed=3, output_type="latent", guidance=1.0, **SIZE)
    light = tiny(PROMPT, image=picture, strength=0.1, **kw)
    text_only = tiny(PROMPT, **kw)
    assert (light - encoded).abs().mean() < 0.25 * (text_only - encoded).abs().mean()


def test_inpainting_keeps_unmasked_latents_and_pixels(tiny):
    picture = _picture(1)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1  # repaint the middle
    kw = dict(steps=4, seed=5, image=picture, mask_image=mask, **SIZE)
    latents = tiny(PROMPT, output_type="latent", **kw)
    encoded = tiny.encode_image(picture)
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    keep[..., 2:6, 2:6] = False
    torch.testing.assert_close(latents[keep.expand_as(latents)], encoded[keep.expand_as(encoded)])
    # pixels outside the mask are the input's own (overlay); inside they are generated
    pixels = tiny(PROMPT, output_type="pt", **kw)
    outside = mask[0, 0] == 0
    torch.testing.assert_close(pixels[0][:, outside], picture[0][:, outside])
    assert (pixels[0][:, ~outside] - picture[0][:, ~outside]).abs().mean() > 0.05
    # without the overlay, the decoder's output differs there (its receptive field is global)
    raw = tiny(PROMPT, output_type="pt", overlay=False, **kw)
    torch.testing.assert_close(raw, tiny.decode(latents))


def test_concurrent_calls_are_serialized_and_correct(tiny):
    kw = dict(steps=2, output_type="pt", **SIZE)
    expected = {s: tiny(PROMPT, seed=s, **kw) for s in range(4)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = tiny(PROMPT, seed=seed, **kw)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in range(4):
        torch.testing.assert_close(results[s], expected[s], rtol=0, atol=0)


def test_concurrent_generate_calls_each_get_their_own_seeds_and_timings(tiny):
    kw = dict(steps=2, output_type="pt", **SIZE)
    results = {}

    def work(seed):
        results[seed] = tiny.generate(PROMPT, seed=seed, **kw)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {s: r.seeds for s, r in results.items()} == {s: [s] for s in range(3)}
    assert len({id(r.stages) for r in results.values()}) == 3
    assert all(len(r.stages.unet_calls_ms) == 2 for r in results.values())


def test_long_prompt_is_truncated_with_a_warning(tiny, caplog):
    long_prompt = "very " * 30  # byte-level tokens: 150 characters > 77
    with caplog.at_level("WARNING"):
        tiny(long_prompt, steps=1, seed=0, output_type="latent", **SIZE)
    assert any("tokens dropped" in r.message for r in caplog.records)


def test_fp16_vae_falls_back_to_float32_on_overflow(tiny):
    from diffrt.pipeline.pipe import Pipeline

    class Overflowing:
        name = "fake"

        def __init__(self):
            self.upcast = False

        def run(self, graph, **inputs):
            image = torch.zeros(1, 3, 8, 8)
            return {"image": image if self.upcast else image.fill_(float("inf"))}

        def upcast_vae(self):
            self.upcast = True

    pipe = Pipeline(tiny.components, Overflowing(), torch.device("cpu"), torch.float16)
    out = pipe.decode(torch.zeros(1, 4, 1, 1))
    assert torch.isfinite(out).all() and pipe.backend.upcast


def test_guidance_embedding_matches_diffusers_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    from diffrt.models.families.base import guidance_embedding

    for dim in (256, 7):
        ours = guidance_embedding(8.5, dim, torch.zeros(1))
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([7.5]), dim)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_pipelines_run_and_stay_close_to_float32(tiny, dtype):
    import diffrt

    low = diffrt.load("tiny", device="cpu", dtype=dtype)
    assert low.components.unet.dtype == getattr(torch, dtype)
    kw = dict(steps=3, seed=2, output_type="pt", **SIZE)
    images = low(PROMPT, **kw)
    assert torch.isfinite(images).all()
    assert (images - tiny(PROMPT, **kw)).abs().mean() < 0.05  # same model, rounded weights


def test_nine_channel_inpainting_unet_gets_mask_and_masked_image(tiny):
    import diffusers

    from diffrt.backends.torch_backend import TorchBackend
    from diffrt.models.components import Components
    from diffrt.models.presets import PRESETS
    from diffrt.pipeline.pipe import Pipeline

    c = tiny.components
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**PRESETS["tiny"].unet, "in_channels": 9}).eval()
    parts = Components("tiny-inpaint", "sd", unet, c.vae, c.text_encoders, c.tokenizers, c.scheduler)
    pipe = Pipeline(parts, TorchBackend(parts, torch.device("cpu"), torch.float32), torch.device("cpu"), torch.float32)
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1
    out = pipe(PROMPT, image=_picture(2), mask_image=mask, steps=2, seed=0, guidance=3.0, output_type="pt", **SIZE)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert seen == [9, 9]  # latents + mask + masked-image latents, one batched CFG call per step
