"""Drop-in fidelity: a diffusers folder as published checkpoints ship it (no diffrt.json) samples as diffusers'
own pipeline does, with every setting left to its default and with only steps and guidance given.

The folders (tests/pipeline/plain_folders.py) carry the schedulers their families ship: SD 1.5's PNDM,
SD 2.1's v-prediction DDIM, SD-Turbo's trailing Euler, a DPM++ 2M Karras, a stochastic Euler ancestral,
SDXL's leading Euler, an LCM (guidance embedding, noise between steps), SD3 and FLUX.1-dev / -schnell.
"""

import diffusers
import numpy as np
import pytest
import torch

import diffrt
from diffrt.core import defaults

from .plain_folders import FOLDERS, build

TOLERANCE = 1e-4  # float32, max per-pixel difference of images in [0, 1]

# (steps, guidance) for the call that gives only those. FLUX.1-schnell has no guidance embedding: FluxPipeline
# ignores guidance_scale there, while diffrt's guidance is classifier-free guidance, so its call gives 0 (off).
EXPLICIT = {"lcm": (3, 6.0), "sd3": (5, 3.0), "flux-dev": (5, 2.0), "flux-schnell": (3, 0.0)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return {name: build(name, root / name) for name in FOLDERS}


def _theirs(folder, prompts, seeds, **kw):
    index = diffrt.models.folders.read_index(folder)
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, generator=generators, output_type="np", **kw).images


def compare(folder, name: str, case: str) -> float:
    """Max pixel difference between diffrt and diffusers on ``folder`` for ``case`` ("default" or "explicit")."""
    ours = diffrt.load(folder, device="cpu", dtype=torch.float32)
    if case == "default":
        prompts, seeds, given, kw = ["a red sneaker"], [3], {}, {}
    else:
        steps, guidance = EXPLICIT.get(name, (7, 4.0))
        prompts, seeds = ["a red sneaker", "a blue coat"], [5, 6]
        given, kw = dict(steps=steps, guidance=guidance), dict(num_inference_steps=steps, guidance_scale=guidance)
    images = ours(prompts, seed=seeds, output_type="np", **given)
    reference = _theirs(folder, prompts, seeds, **kw)
    assert images.shape == reference.shape
    return float(np.abs(images - reference).max())


@pytest.mark.parametrize("case", ["default", "explicit"])
@pytest.mark.parametrize("name", list(FOLDERS))
def test_plain_folder_samples_as_diffusers(folders, name, case):
    assert not (folders[name] / defaults.DEFAULTS_FILE).exists()
    difference = compare(folders[name], name, case)
    assert difference <= TOLERANCE, f"{name} {case}: max pixel difference {difference:.2e}"


def test_defaults_say_where_they_came_from(folders):
    pipe = diffrt.load(folders["flux-dev"], device="cpu")
    assert dict(pipe.defaults) == {"steps": 28, "guidance": 3.5, "max_sequence_length": 512, "sampler": "scheduler"}
    assert pipe.defaults.describe(shown={"sampler": "euler"}) == (
        "sampler euler (from the folder's FlowMatchEulerDiscreteScheduler); 28 steps, guidance 3.5 (from the "
        "folder's FluxPipeline)")  # fmt: skip
    sd = diffrt.load(folders["sd15-pndm"], device="cpu")
    assert sd.defaults.describe({"steps": 20}, shown={"sampler": "pndm"}) == (
        "sampler pndm (from the folder's PNDMScheduler); 20 steps (from the call); guidance 7.5 (from the folder's "
        "StableDiffusionPipeline)")  # fmt: skip
    schnell = diffrt.load(folders["flux-schnell"], device="cpu")
    assert schnell.defaults["guidance"] == 1.0  # FluxPipeline runs no guidance without the embedding


def test_a_named_sampler_runs_on_the_folders_noise_schedule(folders):
    """sampler= picks diffrt's sampler (trailing spacing by default); spacing= without a sampler keeps the
    folder's scheduler with other timesteps; sampler options need a named sampler."""
    pipe = diffrt.load(folders["sd15-pndm"], device="cpu")
    kw = dict(steps=4, seed=0, output_type="latent")
    own = pipe.generate("a coat", **kw)
    assert own.sampler == "pndm"
    assert pipe.generate("a coat", sampler="euler", **kw).sampler == "euler"
    trailing = pipe("a coat", spacing="trailing", **kw)
    assert not torch.equal(trailing, own.images)
    reference = pipe("a coat", scheduler=diffusers.PNDMScheduler.from_config(pipe.components.scheduler.config,
                                                                             timestep_spacing="trailing"), **kw)
    assert torch.equal(trailing, reference)
    with pytest.raises(ValueError, match="need a named sampler"):
        pipe("a coat", eta=0.5, **kw)
    with pytest.raises(ValueError, match="timestep_spacing"):  # steps not equal at 3 trailing steps
        pipe.check("a coat", steps=3, spacing="trailing")


def test_step_noise_follows_diffusers_or_the_device(folders):
    """Ancestral steps draw noise: by default as diffusers does (each image's generator continuing after its
    initial noise); step_noise="device" draws from diffrt's own generators, seeded apart."""
    pipe = diffrt.load(folders["sd-euler-ancestral"], device="cpu")
    kw = dict(steps=5, seed=[1, 2], output_type="latent")
    default = pipe(["a", "b"], **kw)
    assert torch.equal(default, pipe(["a", "b"], step_noise="diffusers", **kw))
    device = pipe(["a", "b"], step_noise="device", **kw)
    assert not torch.allclose(default, device)
    assert torch.equal(device, pipe(["a", "b"], step_noise="device", **kw))  # still seeded
    with pytest.raises(ValueError, match="step_noise must be one of"):
        pipe("a", step_noise="cuda")


def test_image_to_image_matches_diffusers_when_the_posterior_is_sharp(folders, tmp_path):
    """diffrt encodes a picture to the VAE posterior's mean; diffusers samples the posterior (mean + std * z).
    With a VAE whose posterior has no spread the two agree, which shows that diffrt draws z and the noise
    after it in diffusers' order; with a real VAE the latents differ by std * z (documented)."""
    folder = tmp_path / "sharp"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd-turbo-euler"], local_files_only=True)
    with torch.no_grad():  # log-variance -30: std 3e-7
        channels = pipe.vae.config.latent_channels
        pipe.vae.quant_conv.weight[channels:] = 0
        pipe.vae.quant_conv.bias[channels:] = -30
    pipe.save_pretrained(folder, safe_serialization=True)
    picture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = diffrt.load(folder, device="cpu")(["a coat"], image=picture, strength=0.6, steps=6, guidance=3.0, seed=[2],
                                             output_type="np")  # fmt: skip
    theirs = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    reference = theirs(["a coat"], image=picture, strength=0.6, num_inference_steps=6, guidance_scale=3.0,
                       generator=[torch.Generator().manual_seed(2)], output_type="np").images  # fmt: skip
    assert np.abs(ours - reference).max() <= TOLERANCE


def test_outdated_scheduler_config_is_fixed_as_the_pipeline_does(folders, tmp_path):
    """StableDiffusionPipeline sets steps_offset 1 and clip_sample False on an outdated scheduler config when
    it is built (old SD 1.x/2.x folders ship steps_offset 0): diffrt samples with the config it runs."""
    import json
    import shutil

    folder = shutil.copytree(folders["sd21-ddim-v"], tmp_path / "outdated")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(steps_offset=0, clip_sample=True)
    config_file.write_text(json.dumps(config))
    pipe = diffrt.load(folder, device="cpu")
    assert pipe.components.scheduler.config.steps_offset == 1 and not pipe.components.scheduler.config.clip_sample
    assert compare(folder, "sd21-ddim-v", "explicit") <= TOLERANCE
