"""Each trainer lowers its loss in a few dozen steps, and writes a folder that diffrt and diffusers load."""

import json
import os

import pytest
import torch

import diffrt
from diffrt.models.fashion import classifier as fashion_classifier
from diffrt.train import data, models

from .conftest import IMAGES, assert_loss_falls, needs_dataset, smoke

pytestmark = needs_dataset


def generate(folder, steps=2, **kwargs):
    pipe = diffrt.load(folder, device="cpu")
    images = pipe(["an ankle boot", "running shoe"], steps=steps, seed=0, output_type="pt", **kwargs)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    return pipe, images


# ----------------------------------------------------------------------------------------- VAE


def test_vae_loss_falls_and_scaling_factor_is_measured(vae_run):
    assert_loss_falls(vae_run.losses)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_run.folder)
    assert vae.config.scaling_factor == pytest.approx(vae_run.metrics["scaling_factor"])
    assert vae.config.scaling_factor == pytest.approx(1 / vae_run.metrics["latent_std"])
    assert vae.config.scaling_factor != 1.0  # replaced the placeholder
    x = data.to_model_input(data.load_split("test", limit=2).images)
    assert vae.encode(x).latent_dist.mean.shape == (2, 4, 8, 8)
    record = json.loads((vae_run.folder / "train.json").read_text())
    assert record["kind"] == "train-vae" and record["settings"]["seed"] == 0
    assert record["settings"]["data_limit"] == IMAGES and "env" in record
    assert (vae_run.folder / "README.md").read_text().startswith("# fashion VAE")
    umask = os.umask(0)
    os.umask(umask)
    mode = (vae_run.folder / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask  # not safetensors' 0600


# -------------------------------------------------------------------------------------- U-Nets


def test_eps_loss_falls_and_folder_generates(eps_run):
    assert_loss_falls(eps_run.losses)
    pipe, _ = generate(eps_run.folder)
    c = pipe.components
    assert type(c.scheduler).__name__ == "DPMSolverMultistepScheduler" and c.prediction_type == "epsilon"
    assert (c.scheduler.config.beta_schedule, c.scheduler.config.beta_start) == ("scaled_linear", 0.00085)
    assert type(c.text_encoders[0]).__name__ == "BertModel" and c.tokenizers[0].model_max_length == 16
    assert c.defaults == {"steps": 20, "sampler": "dpmpp_2m", "guidance": 6.0}
    assert c.unet.config.cross_attention_dim == 384


def test_flow_loss_falls_and_folder_generates(flow_run):
    assert_loss_falls(flow_run.losses)
    pipe, _ = generate(flow_run.folder, sampler="euler")
    assert pipe.components.is_flow and pipe.components.prediction_type == "flow"


def test_dit_loss_falls_and_folder_generates(dit_run):
    assert_loss_falls(dit_run.losses)
    pipe, _ = generate(dit_run.folder, sampler="euler")
    c = pipe.components
    assert c.family == "flux" and c.unet is None and type(c.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.default_size == 32 and c.scheduler.config.use_dynamic_shifting
    # the grid at the trained size has no shift (mu = 0), as the scheduler's config sets it
    from diffrt.samplers import from_diffusers

    _, grid, _ = from_diffusers(c.scheduler, 4, **pipe.model.timestep_options(c.scheduler, 4, 32, 32))
    assert grid.sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_lcm_loss_falls_and_folder_generates(lcm_run):
    assert_loss_falls(lcm_run.losses)
    pipe, _ = generate(lcm_run.folder, steps=4)
    c = pipe.components
    assert c.is_consistency and c.defaults["sampler"] == "lcm"
    assert c.unet.config.time_cond_proj_dim == models.LCM_COND_DIM
    assert c.scheduler.config.timestep_scaling == 10.0 and c.scheduler.config.original_inference_steps == 50


def test_lcm_scheduler_visits_only_distilled_timesteps(lcm_run):
    from diffrt import samplers
    from diffrt.train.lcm import skipping_schedule

    scheduler = diffrt.load(lcm_run.folder, device="cpu").components.scheduler
    trained = set(skipping_schedule(1000, 50)[0].tolist())
    for n in (1, 2, 4, 8):
        name, grid, _ = samplers.from_diffusers(scheduler, n)
        assert name == "lcm"
        assert set(grid.timesteps[:-1].long().tolist()) <= trained


@pytest.mark.parametrize("which, steps", [("eps", 4), ("lcm", 1)])
def test_diffusers_samples_the_folder_as_diffrt_does(request, which, steps):
    """StableDiffusionPipeline loads the folder (BertModel where it expects CLIP: a warning, no error) and, run
    with the folder's own scheduler, gives diffrt's latents (the LCM compared at 1 step: its re-noising draws
    differ between the two)."""
    from diffusers import StableDiffusionPipeline

    folder = request.getfixturevalue(f"{which}_run").folder
    pipe = diffrt.load(folder, device="cpu")
    ours = pipe("an ankle boot", steps=steps, guidance=4.0, seed=3, output_type="latent",
                scheduler=pipe.components.scheduler)  # fmt: skip
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)(
        "an ankle boot", num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
        generator=torch.Generator().manual_seed(3),
    ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))


def test_diffusers_cannot_run_the_flow_folder_in_stable_diffusion_pipeline(flow_run):
    """diffusers has no SD-style pipeline for a flow-matching U-Net: StableDiffusionPipeline loads the folder
    but its loop calls scheduler.scale_model_input, which FlowMatchEulerDiscreteScheduler lacks."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(flow_run.folder, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(AttributeError, match="scale_model_input|init_noise_sigma"):
        pipe("an ankle boot", num_inference_steps=2, output_type="np")


def broken_copy(folder, tmp_path):
    """A copy of a pipeline folder (its 90 MB text encoder linked, not copied)."""
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("text_encoder"))
    (copy / "text_encoder").symlink_to(folder / "text_encoder")
    return copy


def test_truncated_unet_weights_give_a_clear_error(eps_run, tmp_path):
    folder = broken_copy(eps_run.folder, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="could not load the unet"):
        diffrt.load(folder, device="cpu")


def test_unet_config_missing_a_field_gives_a_clear_error(eps_run, tmp_path):
    folder = broken_copy(eps_run.folder, tmp_path)
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    del config["block_out_channels"]  # diffusers falls back to SD's widths, which the weights do not fit
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="could not load the unet"):
        diffrt.load(folder, device="cpu")


# ---------------------------------------------------------------------------------- classifier


def test_classifier_loss_falls_and_reference_matches(tmp_path):
    from diffrt.train import ClassifierSettings, train_classifier

    settings = smoke(ClassifierSettings(), lr=3e-3, kid_rows=100)
    result = train_classifier(tmp_path / "classifier", settings, progress=False)
    assert_loss_falls(result.losses)
    model = fashion_classifier.load_classifier(result.folder)
    reference = fashion_classifier.load_reference(result.folder / fashion_classifier.REFERENCE_FILE, classifier=model)
    assert int(reference["fid_n"]) == IMAGES and reference["kid_features"].shape == (100, 16)
    assert 0 <= result.metrics["test_accuracy"] <= 1
    config = json.loads((result.folder / "config.json").read_text())
    assert config["class_names"][9] == "Ankle boot" and config["num_features"] == 16


# ---------------------------------------------------------------------------------- settings


def test_unet_trainers_need_a_vae_and_lcm_a_teacher(tmp_path):
    from diffrt.train import DiffusionSettings, LCMSettings, train_eps, train_lcm

    with pytest.raises(ValueError, match="--vae DIR"):
        train_eps(tmp_path, DiffusionSettings(), progress=False)
    with pytest.raises(ValueError, match="--teacher DIR"):
        train_lcm(tmp_path, LCMSettings(), progress=False)
    with pytest.raises(FileNotFoundError, match="diffrt train vae"):
        train_eps(tmp_path, DiffusionSettings(vae=str(tmp_path / "none")), progress=False)


def test_eps_model_warm_starts_from_a_flow_folder(vae_run, flow_run, tmp_path):
    """``fashion`` may start from ``fashion-flow``'s U-Net: weights taken as they are, objective switched."""
    from safetensors.torch import load_file

    from diffrt.train import DiffusionSettings, train_eps
    from diffrt.train.diffusion import initial_unet

    settings = smoke(DiffusionSettings(vae=str(vae_run.folder), init=str(flow_run.folder)), steps=1)
    unet = initial_unet(settings, cross_attention_dim=384)
    saved = load_file(flow_run.folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet.state_dict()[k].float(), v.float()) for k, v in saved.items())
    run = train_eps(tmp_path / "eps", settings, progress=False)
    assert diffrt.load(run.folder, device="cpu").components.prediction_type == "epsilon"


def test_flow_teacher_is_refused(flow_run, tmp_path):
    from diffrt.train import LCMSettings, train_lcm

    with pytest.raises(ValueError, match="must be an eps-prediction model"):
        train_lcm(tmp_path, LCMSettings(teacher=str(flow_run.folder)), progress=False)


def test_evaluate_pipeline_scores_a_model(eps_run):
    from diffrt.bench import quality

    torch.manual_seed(0)
    classifier = fashion_classifier.FashionClassifier(widths=(8, 8, 8), num_features=8).eval()
    real = data.to_unit(data.load_split("test", limit=40).images)
    reference = fashion_classifier.reference_statistics(classifier, real, kid_rows=40)
    pipe = diffrt.load(eps_run.folder, device="cpu")
    scores = quality.evaluate_pipeline(pipe, per_class=1, prompts="held_out", classifier=classifier,
                                       reference=reference, steps=2, batch_size=4)  # fmt: skip
    assert scores["images"] == 10 and 0 <= scores["adherence"] <= 1
    assert set(scores["adherence_per_class"]) == set(data.CLASS_NAMES)
    assert scores["fid"] >= 0 and scores["call_options"] == {"steps": "2"}


# ----------------------------------------------------------------------------------------- LoRA


def test_lora_trainer_writes_an_adapter_diffrt_and_its_card_read(tmp_path):
    from diffrt.train.lora import LoraTrainSettings, train_lora

    settings = smoke(LoraTrainSettings(), size="full", data_limit=600, steps=3, batch_size=16)
    result = train_lora(tmp_path / "lora", settings, progress=False)
    assert result.metrics["train_images"] == int((data.load_split("train", limit=600).labels == 3).sum())
    pipe = diffrt.load("fashion", device="cpu")
    base = pipe("a piece of clothing", steps=2, seed=0, output_type="pt")
    assert pipe.load_lora(result.folder) == "lora"
    assert pipe.loras["lora"]["ranks"] == [4] and pipe.loras["lora"]["parts"] == ["unet"]
    assert not torch.equal(pipe("a piece of clothing", steps=2, seed=0, output_type="pt"), base)
    assert "## Effect" in (result.folder / "README.md").read_text()
    with pytest.raises(ValueError, match="label must be a Fashion-MNIST class"):
        train_lora(tmp_path / "bad", smoke(LoraTrainSettings(), label=12), progress=False)


# ----------------------------------------------------------------------------------------- ControlNet
def test_controlnet_trainer_writes_a_controlnet_diffrt_and_diffusers_read(tmp_path):
    pytest.importorskip("cv2")
    from diffusers import ControlNetModel
    from safetensors import safe_open

    from diffrt.train.controlnet import ControlNetTrainSettings, train_controlnet

    settings = smoke(ControlNetTrainSettings(), size="full", data_limit=200, steps=3, batch_size=8)
    result = train_controlnet(tmp_path / "cn", settings, progress=False)
    assert result.metrics["train_images"] == 200 and len(result.losses) == 3
    with safe_open(str(result.folder / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}  # shipped in float16
    assert ControlNetModel.from_pretrained(result.folder).config.conditioning_embedding_out_channels == [16, 32, 64]
    pipe = diffrt.load("fashion", device="cpu", controlnet=result.folder)
    edges = torch.zeros(1, 3, 32, 32)
    edges[..., 8:24, 8] = 1
    images = pipe("a dress", control_image=edges, steps=2, seed=0, output_type="pt")
    assert images.shape == (1, 3, 32, 32) and "## Evaluation" in (result.folder / "README.md").read_text()
    with pytest.raises(ValueError, match="p_empty must be in"):
        train_controlnet(tmp_path / "bad", smoke(ControlNetTrainSettings(), p_empty=1.0), progress=False)
