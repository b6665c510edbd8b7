"""ControlNets: diffusers' own ControlNet pipelines give the same images (SD and SDXL, one and two ControlNets,
start/end and guess mode); onnxruntime, the captured loop and the triton kernels match torch; bad calls fail in
one line."""

import dataclasses

import diffusers
import numpy as np
import pytest
import torch

import diffrt
from diffrt.backends.graphs import LoopGraphCache, ReplayEmulation
from diffrt.models import control

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PROMPTS = ["a red sneaker", "a blue coat"]


def random_controlnet(unet, folder, seed):
    """A ControlNet copied from ``unet`` with random outputs strong enough to change the images, saved."""
    control.random_controlnet(unet, seed, std=0.3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def controlnets(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return [random_controlnet(tiny.components.unet, root / f"cn{k}", k) for k in range(2)]


@pytest.fixture(scope="module")
def pictures():
    generator = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 64, 64, generator=generator), torch.rand(1, 3, 48, 80, generator=generator)  # resized


def _latents(seeds, shape=(4, 8, 8)):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _diffusers(pipeline_class, folder, controlnet_folders, scheduler, **call):
    nets = [diffusers.ControlNetModel.from_pretrained(f) for f in controlnet_folders]
    theirs = pipeline_class.from_pretrained(folder, controlnet=nets if len(nets) > 1 else nets[0], scheduler=scheduler,
                                            local_files_only=True)  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    return theirs(PROMPTS, latents=_latents([4, 5]), output_type="np", **call).images


CASES = {
    "one": dict(count=1, scale=0.8),
    "guess_mode": dict(count=1, scale=0.8, guess_mode=True),
    "start_end": dict(count=1, scale=1.2, start=0.2, end=0.7),
    "two": dict(count=2, scale=[0.8, 0.5], start=[0.0, 0.25], end=[1.0, 0.8]),
    "two_guess_mode": dict(count=2, scale=[0.6, 1.0], guess_mode=True),
}


@pytest.mark.parametrize("case", CASES)
def test_sd_controlnets_match_diffusers(tiny_folder, controlnets, pictures, case):
    settings = CASES[case]
    count, guess = settings["count"], settings.get("guess_mode", False)
    folders, images = controlnets[:count], list(pictures[:count]) if count > 1 else pictures[0]
    start, end = settings.get("start", 0.0), settings.get("end", 1.0)
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE)
    reference = _diffusers(diffusers.StableDiffusionControlNetPipeline, tiny_folder, folders, scheduler, image=images,
                           controlnet_conditioning_scale=settings["scale"], guess_mode=guess,
                           control_guidance_start=start, control_guidance_end=end, height=64, width=64,
                           num_inference_steps=5, guidance_scale=5.0)  # fmt: skip
    ours = diffrt.load(tiny_folder, device="cpu", dtype=torch.float32, controlnet=folders)
    call = dict(steps=5, scheduler=scheduler, guidance=5.0, seed=[4, 5], height=64, width=64, output_type="np")
    images_out = ours(PROMPTS, control_image=images, controlnet_scale=settings["scale"], control_start=start,
                      control_end=end, guess_mode=guess, **call)  # fmt: skip
    assert np.abs(images_out - reference).max() <= 1e-4
    off = ours(PROMPTS, control_image=images, controlnet_scale=[0.0] * count if count > 1 else 0.0, **call)
    assert np.abs(images_out - off).max() > 1e-2  # the control does change the images


def test_sdxl_controlnets_match_diffusers(tiny_sdxl_folder, tmp_path, pictures):
    ours = diffrt.load(tiny_sdxl_folder, device="cpu", dtype=torch.float32)
    folders = [random_controlnet(ours.components.unet, tmp_path / f"x{k}", 10 + k) for k in range(2)]
    scheduler = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="trailing")
    for guess in (False, True):
        reference = _diffusers(diffusers.StableDiffusionXLControlNetPipeline, tiny_sdxl_folder, folders, scheduler,
                               image=list(pictures), controlnet_conditioning_scale=[0.7, 0.9], guess_mode=guess,
                               control_guidance_end=[1.0, 0.6], height=64, width=64, num_inference_steps=4,
                               guidance_scale=5.0)  # fmt: skip
        controlled = diffrt.load(tiny_sdxl_folder, device="cpu", dtype=torch.float32, controlnet=folders)
        images = controlled(PROMPTS, control_image=list(pictures), controlnet_scale=[0.7, 0.9], control_end=[1.0, 0.6],
                            guess_mode=guess, steps=4, scheduler=scheduler, guidance=5.0, seed=[4, 5], height=64,
                            width=64, output_type="np")  # fmt: skip
        assert np.abs(images - reference).max() <= 1e-4


def test_onnxruntime_runs_controlnets_as_torch_does(tiny_folder, controlnets, pictures, tmp_path):
    call = dict(steps=4, guidance=5.0, seed=[4, 5], height=64, width=64, output_type="np",
                control_image=list(pictures), controlnet_scale=[0.8, 0.5], control_start=[0.0, 0.25])  # fmt: skip
    reference = diffrt.load(tiny_folder, device="cpu", controlnet=controlnets)
    ours = diffrt.load(tiny_folder, device="cpu", backend="onnxruntime", cache_dir=tmp_path, controlnet=controlnets)
    assert set(ours.backend.specs) >= {"controlnet_0", "controlnet_1"}
    for guess in (False, True):
        expected = reference(PROMPTS, guess_mode=guess, **call)
        assert np.abs(ours(PROMPTS, guess_mode=guess, **call) - expected).max() <= 1 / 255


def test_onnxruntime_runs_sdxl_controlnets_as_torch_does(tiny_sdxl_folder, pictures, tmp_path):
    unet = diffrt.load(tiny_sdxl_folder, device="cpu").components.unet
    folder = random_controlnet(unet, tmp_path / "xl", 10)
    call = dict(steps=3, guidance=5.0, seed=[4, 5], height=64, width=64, output_type="np", control_image=pictures[1],
                controlnet_scale=0.7, control_end=0.7)  # fmt: skip
    reference = diffrt.load(tiny_sdxl_folder, device="cpu", controlnet=folder)
    ours = diffrt.load(tiny_sdxl_folder, device="cpu", backend="onnxruntime", cache_dir=tmp_path, controlnet=folder)
    for guess in (False, True):
        expected = reference(PROMPTS, guess_mode=guess, **call)
        assert np.abs(ours(PROMPTS, guess_mode=guess, **call) - expected).max() <= 1 / 255


def test_a_captured_loop_holds_the_controlnets_and_reads_new_images_and_scales(tiny_folder, controlnets, pictures):
    """The capture path on the CPU (ReplayEmulation): the ControlNets run inside the loop; a second call with
    other control images and scales replays the same graph and equals an uncaptured call."""
    pipe = diffrt.load(tiny_folder, device="cpu", controlnet=controlnets)
    size = dict(steps=4, guidance=5.0, height=64, width=64, output_type="latent", progress=False)
    calls = [dict(prompt="a boot", seed=1, control_image=list(pictures), controlnet_scale=[0.8, 0.5],
                  control_end=[1.0, 0.5], **size),
             dict(prompt="a bag", seed=2, control_image=[pictures[1], pictures[0]], controlnet_scale=[1.3, 0.2],
                  control_end=[1.0, 0.5], **size)]  # fmt: skip
    pipe.backend.loop_capture = cache = LoopGraphCache(max_graphs=8, capture=ReplayEmulation)
    try:
        replayed = [pipe(**call) for call in calls]
    finally:
        pipe.backend.loop_capture = None
    assert cache.captures == 1
    for ours, call in zip(replayed, calls, strict=True):
        torch.testing.assert_close(ours, pipe(**call), rtol=0, atol=1e-6)


def test_the_triton_backend_runs_patched_controlnets(tiny_folder, controlnets, pictures):
    kw = dict(steps=1, guidance=1.0, seed=0, height=32, width=32, output_type="np", control_image=pictures[0])
    ours = diffrt.load(tiny_folder, device="cpu", backend="triton", controlnet=controlnets[:1])
    assert len(ours.backend.patches) == 3  # U-Net, VAE and the ControlNet
    reference = diffrt.load(tiny_folder, device="cpu", controlnet=controlnets[:1])
    assert np.abs(ours(PROMPTS[0], **kw) - reference(PROMPTS[0], **kw)).max() <= 1e-4


@pytest.mark.gpu
def test_the_cuda_graph_loop_runs_the_controlnets_and_replays_new_scales(tiny_folder, controlnets, pictures):
    kw = dict(steps=4, guidance=5.0, seed=1, height=64, width=64, output_type="np", control_image=list(pictures),
              control_end=[1.0, 0.5])  # fmt: skip
    ours = diffrt.load(tiny_folder, device="cuda", dtype=torch.float16, backend="triton", controlnet=controlnets)
    reference = diffrt.load(tiny_folder, device="cuda", dtype=torch.float16, controlnet=controlnets)
    for scales in ([0.8, 0.5], [1.2, 0.0]):
        images = ours(PROMPTS[0], controlnet_scale=scales, **kw)
        assert np.abs(images - reference(PROMPTS[0], controlnet_scale=scales, **kw)).max() <= 2e-2
    assert ours.backend.loop_capture.captures == 1


@pytest.mark.slow
@pytest.mark.parametrize("aot", [False, True], ids=["torch.compile", "aot"])
def test_the_compile_backend_compiles_the_controlnets_and_matches_eager(tiny_folder, controlnets, pictures, tmp_path,
                                                                        aot):  # fmt: skip
    kw = dict(steps=2, guidance=5.0, seed=1, height=64, width=64, output_type="np", control_image=pictures[0])
    ours = diffrt.load(tiny_folder, device="cpu", backend="compile", cache_dir=tmp_path, controlnet=controlnets[:1],
                       aot=aot)  # fmt: skip
    assert "controlnet_0" in ours.backend.compiled
    reference = diffrt.load(tiny_folder, device="cpu", controlnet=controlnets[:1])
    assert np.abs(ours(PROMPTS[0], **kw) - reference(PROMPTS[0], **kw)).max() <= 1e-4


def test_image_to_image_and_inpainting_take_control(tiny_folder, controlnets, pictures):
    pipe = diffrt.load(tiny_folder, device="cpu", controlnet=controlnets[:1])
    plain = diffrt.load(tiny_folder, device="cpu")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    for extra in (dict(image=image, strength=0.6), dict(image=image, mask_image=mask)):
        kw = dict(steps=4, guidance=5.0, seed=2, output_type="np", **extra)
        off = pipe(PROMPTS[0], control_image=pictures[0], controlnet_scale=0.0, **kw)
        assert np.array_equal(off, plain(PROMPTS[0], **kw))  # scale 0: the plain model's images, bit for bit
        assert np.abs(pipe(PROMPTS[0], control_image=pictures[0], **kw) - off).max() > 1e-2


def test_a_nine_channel_unets_controlnet_sees_the_latents_only(tiny, controlnets, pictures):
    from diffrt.pipeline.pipe import Pipeline

    config = {k: v for k, v in tiny.components.unet.config.items() if not k.startswith("_")}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**{**config, "in_channels": 9}).eval()
    parts = dataclasses.replace(tiny.components, unet=unet)
    parts.controlnets = control.load(controlnets[:1], parts)
    pipe = Pipeline(parts, diffrt.backends.create("torch", parts, torch.device("cpu"), torch.float32),
                    torch.device("cpu"), torch.float32)  # fmt: skip
    mask = torch.ones(1, 1, 64, 64)
    images = pipe("a boot", image=pictures[0], mask_image=mask, control_image=pictures[1], steps=2, seed=0,
                  output_type="np")  # fmt: skip
    assert np.isfinite(images).all()


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_control_calls_fail_in_one_line(tiny_folder, controlnets, pictures):
    two = diffrt.load(tiny_folder, device="cpu", controlnet=controlnets)
    none = diffrt.load(tiny_folder, device="cpu")
    kw = dict(steps=1, height=64, width=64)
    cases = [
        (two, dict(control_image=pictures[0]), "control_image has 1 entry for 2 ControlNets"),
        (two, dict(), "has 2 ControlNet.*give control_image="),
        (none, dict(control_image=pictures[0]), "no ControlNet: load one"),
        (two, dict(control_image=list(pictures), controlnet_scale=[1.0]), "controlnet_scale has 1 values for 2"),
        (two, dict(control_image=list(pictures), controlnet_scale=[1.0, -0.5]), "must be >= 0.*got -0.5"),
        (two, dict(control_image=list(pictures), control_start=0.6, control_end=0.4), "start < end.*0.6.*0.4"),
        (two, dict(control_image=list(pictures), guess_mode="yes"), "guess_mode must be True or False"),
        (two, dict(control_image=[torch.rand(3, 3, 64, 64), pictures[1]], num_images=2),
         "control_image 0 has 3 pictures for 2 images"),
        (two, dict(control_image=[pictures[0] * 2, pictures[1]]), r"control_image 0 values must be in \[0, 1\]"),
        (two, dict(control_image=list(pictures), cache="deepcache:interval=2"), "cache= does not run with Control"),
    ]  # fmt: skip
    for pipe, extra, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe("a boot", **kw, **extra)


def test_controlnets_for_another_base_are_refused_by_their_first_mismatch(tiny_folder, tiny_sdxl_folder, controlnets,
                                                                         tmp_path):  # fmt: skip
    with pytest.raises(ValueError, match=r"made for another base model: its cross_attention_dim is 32 where this "
                                         r"U-Net's is 64 \(an SD ControlNet on SDXL"):  # fmt: skip
        diffrt.load(tiny_sdxl_folder, device="cpu", controlnet=controlnets[0])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        diffrt.load(tiny_folder, device="cpu", controlnet=tmp_path / "missing")
    with pytest.raises(ValueError, match="not yet on flux models"):
        diffrt.load("tiny-flux", device="cpu", controlnet=controlnets[0])
    deployed = diffrt.models.components.Components("x", "sd", None, None, [], [], None, deployed={"kind": "onnx"})
    with pytest.raises(ValueError, match="deployed export holds no U-Net"):
        control.load(controlnets[0], deployed)


def test_the_size_defaults_to_the_control_pictures(tiny_folder, controlnets):
    pipe = diffrt.load(tiny_folder, device="cpu", controlnet=controlnets[:1])
    images = pipe("a boot", control_image=torch.rand(1, 3, 48, 80), steps=1, output_type="np")
    assert images.shape[1:3] == (48, 80)


def test_control_images_are_resized_as_diffusers_does(pictures):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from diffrt.models.control import control_images

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    grey = Image.fromarray((np.random.default_rng(0).random((40, 56)) * 255).astype(np.uint8), mode="L")
    for picture in (grey, pictures[1], pictures[1][0].permute(1, 2, 0).numpy()):
        theirs = processor.preprocess(picture, height=64, width=32)
        ours = control_images(picture, 1, 64, 32)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)


def test_canny_edges_trace_a_square():
    pytest.importorskip("cv2")
    from PIL import Image

    from diffrt.models.control import canny

    square = np.zeros((32, 32), np.uint8)
    square[8:24, 8:24] = 255
    edges = np.asarray(canny(Image.fromarray(square)))[..., 0] > 0
    assert edges.shape == (32, 32) and edges[8:24, 8:24].any() and not edges[12:20, 12:20].any()
    assert not edges[:4].any() and edges[7:9, 10:22].any()  # the top side, within a pixel of where it lies
    with pytest.raises(ValueError, match="0 <= low < high"):
        canny(Image.fromarray(square), low=200, high=100)


def test_cli_generate_with_a_controlnet(tiny_folder, controlnets, tmp_path, capsys):
    pytest.importorskip("cv2")
    from PIL import Image

    from diffrt.cli import main

    source = tmp_path / "shape.png"
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    Image.fromarray(square).save(source)
    out, plain = tmp_path / "out.png", tmp_path / "plain.png"
    base = ["generate", "a boot", "--model", str(tiny_folder), "--steps", "2", "--device", "cpu"]
    assert main([*base, "-o", str(plain)]) == 0
    assert main([*base, "-o", str(out), "--controlnet", str(controlnets[0]), "--control-image", str(source),
                 "--canny", "--control-scale", "1.5"]) == 0  # fmt: skip
    assert Image.open(out).size == (64, 64) and out.read_bytes() != plain.read_bytes()
    assert main([*base, "-o", str(out), "--controlnet", str(controlnets[0])]) == 2
    assert "give control_image=" in capsys.readouterr().err
