"""SD3 and FLUX.1: tiny random folders through diffusers' own pipelines and through diffrt give the same images
(float32, same seeds, steps and guidance), and what a user can get wrong is a clear error."""

import json
import logging
import shutil

import diffusers
import numpy as np
import pytest
import torch

import diffrt
from diffrt.models.families import flux_layout
from diffrt.models.folders import save_folder as save_components


def _noise(seeds, shape):
    # diffrt draws image k's initial noise from a CPU generator seeded with seed k, as diffusers draws it
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _folder(tmp_path_factory, preset, **transformer_changes):
    components = diffrt.load(preset, device="cpu").components
    if transformer_changes:
        config = {**components.transformer.config, **transformer_changes}
        with torch.random.fork_rng():
            torch.manual_seed(1)
            components.transformer = type(components.transformer).from_config(config).eval()
    return save_components(components, tmp_path_factory.mktemp(preset) / preset)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return _folder(tmp_path_factory, "tiny-sd3")


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return _folder(tmp_path_factory, "tiny-flux")


def _theirs(cls, folder, scheduler=None, **parts):
    extra = {} if scheduler is None else {"scheduler": scheduler}
    pipe = cls.from_pretrained(folder, local_files_only=True, **extra, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a red sneaker", "a blue coat", "a bag"]
SIZES = [(64, 64, [3]), (48, 80, [4, 5])]  # two resolutions, batch 1 and 2


@pytest.mark.parametrize("height,width,seeds", SIZES)
def test_sd3_matches_diffusers(sd3_folder, height, width, seeds):
    ours = diffrt.load(sd3_folder, device="cpu")
    theirs = _theirs(diffusers.StableDiffusion3Pipeline, sd3_folder)
    prompts = PROMPTS[: len(seeds)]
    latents = _noise(seeds, ours.model.latent_shape(height, width))
    reference = theirs(prompts, negative_prompt=["blurry"] * len(seeds), latents=latents, height=height, width=width,
                       num_inference_steps=4, guidance_scale=5.0, output_type="np").images  # fmt: skip
    images = ours(prompts, negative_prompt="blurry", steps=4, guidance=5.0, seed=seeds, height=height, width=width,
                  output_type="np")  # fmt: skip
    assert np.abs(images - reference).max() <= 1e-4


@pytest.mark.parametrize(
    "scheduler",
    [
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.16),
        diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1, use_karras_sigmas=True),
        diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
        diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    ],
    ids=["euler_dynamic_shift", "euler_terminal_karras", "dpmpp_2m_flow", "unipc_flow"],
)
def test_sd3_with_a_configured_scheduler_matches_diffusers(sd3_folder, scheduler):
    ours = diffrt.load(sd3_folder, device="cpu")
    theirs = _theirs(diffusers.StableDiffusion3Pipeline, sd3_folder, scheduler)
    latents = _noise([7], ours.model.latent_shape(64, 48))
    reference = theirs("a red sneaker", latents=latents, height=64, width=48, num_inference_steps=5,
                       guidance_scale=4.0, output_type="np").images  # fmt: skip
    images = ours("a red sneaker", steps=5, guidance=4.0, seed=7, height=64, width=48, scheduler=scheduler,
                  output_type="np")  # fmt: skip
    assert np.abs(images - reference).max() <= 1e-4


def test_sd3_folder_without_t5_uses_zero_states_as_diffusers(tmp_path):
    components = diffrt.load("tiny-sd3", device="cpu").components
    components.text_encoders, components.tokenizers = components.text_encoders[:2], components.tokenizers[:2]
    folder = save_components(components, tmp_path / "no-t5")
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    ours = diffrt.load(folder, device="cpu")
    assert len(ours.components.text_encoders) == 2
    theirs = _theirs(diffusers.StableDiffusion3Pipeline, folder, text_encoder_3=None, tokenizer_3=None)
    latents = _noise([1], ours.model.latent_shape(64, 64))
    reference = theirs("a coat", latents=latents, height=64, width=64, num_inference_steps=3, guidance_scale=5.0,
                       output_type="np").images  # fmt: skip
    images = ours("a coat", steps=3, guidance=5.0, seed=1, height=64, width=64, output_type="np")
    assert np.abs(images - reference).max() <= 1e-4


@pytest.mark.parametrize("height,width,seeds", SIZES)
def test_flux_dev_matches_diffusers(flux_folder, height, width, seeds):
    """Guidance-distilled: the scale is an input of the transformer, one pass per step."""
    ours = diffrt.load(flux_folder, device="cpu")
    theirs = _theirs(diffusers.FluxPipeline, flux_folder)
    prompts = PROMPTS[: len(seeds)]
    latents = flux_layout.pack(_noise(seeds, ours.model.latent_shape(height, width)))
    reference = theirs(prompts, latents=latents, height=height, width=width, num_inference_steps=4,
                       guidance_scale=3.5, max_sequence_length=32, output_type="np").images  # fmt: skip
    images = ours(prompts, steps=4, guidance=3.5, seed=seeds, height=height, width=width, output_type="np")
    assert np.abs(images - reference).max() <= 1e-4


def test_flux_true_cfg_matches_diffusers(flux_folder):
    ours = diffrt.load(flux_folder, device="cpu")
    theirs = _theirs(diffusers.FluxPipeline, flux_folder)
    latents = flux_layout.pack(_noise([2], ours.model.latent_shape(64, 64)))
    reference = theirs("a boot", negative_prompt="blurry", true_cfg_scale=2.5, latents=latents, height=64, width=64,
                       num_inference_steps=3, guidance_scale=3.5, max_sequence_length=32,
                       output_type="np").images  # fmt: skip
    images = ours("a boot", negative_prompt="blurry", true_cfg=2.5, steps=3, guidance=3.5, seed=2, height=64,
                  width=64, output_type="np")  # fmt: skip
    assert np.abs(images - reference).max() <= 1e-4


def test_flux_without_guidance_embedding_uses_guidance_as_cfg(tmp_path_factory):
    """schnell-shaped (no guidance embedding): guidance 1 is one pass; guidance 3 is classifier-free guidance
    with the empty prompt, which diffusers calls true_cfg_scale with negative_prompt=""."""
    folder = _folder(tmp_path_factory, "tiny-flux", guidance_embeds=False)
    ours = diffrt.load(folder, device="cpu")
    theirs = _theirs(diffusers.FluxPipeline, folder)
    latents = flux_layout.pack(_noise([0], ours.model.latent_shape(64, 64)))
    common = dict(latents=latents, height=64, width=64, num_inference_steps=3, max_sequence_length=32,
                  output_type="np")  # fmt: skip
    plain = theirs("a shirt", **common).images
    guided = theirs("a shirt", negative_prompt="", true_cfg_scale=3.0, **common).images
    ours_plain = ours("a shirt", steps=3, guidance=1.0, seed=0, height=64, width=64, output_type="np")
    ours_guided = ours("a shirt", steps=3, guidance=3.0, seed=0, height=64, width=64, output_type="np")
    assert np.abs(ours_plain - plain).max() <= 1e-4
    assert np.abs(ours_guided - guided).max() <= 1e-4
    with pytest.raises(ValueError, match="true_cfg applies to guidance-distilled"):
        ours("a shirt", true_cfg=2.0, steps=1)


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_every_flow_sampler_image_to_image_and_inpainting_run(preset):
    from diffrt import samplers

    pipe = diffrt.load(preset, device="cpu")
    flow_samplers = [name for name in samplers.available() if samplers.get(name).suits_flow]
    assert {"euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc"} <= set(flow_samplers)
    for name in flow_samplers:
        images = pipe("a coat", sampler=name, steps=3, seed=0, output_type="np")
        assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all(), name
    picture = pipe("a coat", steps=2, seed=0, output_type="pt")
    again = pipe("a coat", image=picture, strength=0.5, steps=4, seed=1, output_type="pt")
    assert again.shape == picture.shape and not torch.equal(again, picture)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1
    painted = pipe("a coat", image=picture, mask_image=mask, steps=3, seed=2, output_type="pt")
    assert torch.allclose(painted[..., :32], picture[..., :32], atol=1e-6)  # kept pixels pasted back


# ------------------------------------------------------------------------------------------- bad input
def test_sizes_the_transformer_cannot_patch_are_refused():
    flux = diffrt.load("tiny-flux", device="cpu")
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        flux("a coat", height=72, steps=1)
    sd3 = diffrt.load("tiny-sd3", device="cpu")
    with pytest.raises(ValueError, match="width must be a multiple of 16"):
        sd3("a coat", width=40, steps=1)


def test_a_prompt_longer_than_max_sequence_length_is_truncated_with_a_warning(caplog):
    flux = diffrt.load("tiny-flux", device="cpu")
    with caplog.at_level(logging.WARNING):
        flux("a very long prompt " * 8, steps=1, max_sequence_length=16, seed=0)
    assert "longer than the text encoder's 16 tokens" in caplog.text
    with pytest.raises(ValueError, match=r"max_sequence_length must be an integer in \[1, 512\]"):
        flux("a coat", steps=1, max_sequence_length=1000)
    with pytest.raises(ValueError, match="max_sequence_length applies to models with a T5"):
        diffrt.load("tiny", device="cpu")("a coat", steps=1, max_sequence_length=16)


def test_a_folder_missing_its_t5_tokenizer_is_one_clear_error(sd3_folder, tmp_path):
    broken = shutil.copytree(sd3_folder, tmp_path / "broken")
    shutil.rmtree(broken / "tokenizer_3")
    with pytest.raises(FileNotFoundError, match="lists 'tokenizer_3' in model_index.json but has no tokenizer_3/"):
        diffrt.load(broken, device="cpu")


def test_a_flux_folder_with_a_mismatched_vae_is_one_clear_error(flux_folder, tmp_path):
    broken = shutil.copytree(flux_folder, tmp_path / "broken")
    config = json.loads((broken / "vae" / "config.json").read_text())
    vae = diffusers.AutoencoderKL.from_config({**config, "latent_channels": 4})
    shutil.rmtree(broken / "vae")
    vae.save_pretrained(broken / "vae")
    with pytest.raises(ValueError, match="takes 64 packed channels .* but the VAE makes 4-channel latents"):
        diffrt.load(broken, device="cpu")


def test_a_preset_too_large_for_the_device_is_refused_before_allocating():
    from diffrt.models import presets

    sizes = presets.weight_bytes(presets.PRESETS["flux-dev"], torch.bfloat16)
    assert 23.5e9 < sizes["transformer"] < 24.0e9  # FLUX.1-dev: 11.9B parameters
    free = 0.5 * sum(presets.weight_bytes(presets.PRESETS["flux-dev"]).values())
    with pytest.raises(ValueError, match=r"preset 'flux-dev' in float32 needs 67\.\d GB for its weights"):
        presets.check_fits(presets.PRESETS["flux-dev"], torch.float32, "cpu", free=free)


def test_from_diffusers_maps_flow_options_or_refuses_them_by_name():
    from diffrt.samplers import from_diffusers

    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    with pytest.raises(ValueError, match="use_dynamic_shifting=True needs mu="):
        from_diffusers(dynamic, 4)
    _, grid, _ = from_diffusers(dynamic, 4, mu=0.8)
    reference = diffusers.FlowMatchEulerDiscreteScheduler.from_config(dynamic.config)
    reference.set_timesteps(4, mu=0.8)
    assert grid.sigmas.tolist() == pytest.approx(reference.sigmas.tolist()) and grid.kind == "flow"
    with pytest.raises(ValueError, match="stochastic_sampling=True is not supported"):
        from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 4)
    with pytest.raises(ValueError, match="prediction_type='epsilon' is not supported"):
        from_diffusers(diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True), 4)


def test_a_preset_has_the_same_weights_in_every_dtype():
    """Built in float32 and cast (where float32 fits), so dtype comparisons compare the same model."""
    full = diffrt.load("tiny-flux", device="cpu").components.transformer
    half = diffrt.load("tiny-flux", device="cpu", dtype="bfloat16").components.transformer
    for (name, a), b in zip(full.named_parameters(), half.parameters(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name
