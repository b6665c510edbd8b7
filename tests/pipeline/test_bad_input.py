"""Every input a user can get wrong fails early with a ValueError/FileNotFoundError that names it."""

import json
import shutil

import numpy as np
import pytest
import torch

import diffrt

SIZE = dict(height=64, width=64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=60), "height must be a multiple of 8"),
        (dict(width=8), "at least 16"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(sampler="plms"), "unknown sampler 'plms'; available: .*dpmpp_2m"),
        (dict(guidance=-1.0), "guidance must be"),
        (dict(guidance=float("nan")), "guidance must be"),
        (dict(guidance_rescale=2.0), "guidance_rescale"),
        (dict(output_type="jpeg"), "output_type must be one of"),
        (dict(spacing="cosine"), "spacing must be one of"),
        (dict(num_images=0), "num_images"),
        (dict(seed="abc"), "seed must be"),
        (dict(seed=[1, 2, 3]), "seed list has 3 entries but 1"),
        (dict(eta=0.5), r"\['eta'\] do not apply to sampler 'dpmpp_2m'"),
        (dict(sampler="ddim", eta=3.0), "eta must be"),
        (dict(image=torch.rand(1, 3, 64, 64), strength=0.0), r"strength must be a number in \(0, 1\]"),
        (dict(image=torch.rand(1, 3, 64, 64), strength=1.5), r"strength must be a number in \(0, 1\]"),
        (dict(image=torch.rand(1, 3, 64, 64) * 3), r"values must be in \[0, 1\]"),
        (dict(image=torch.rand(1, 4, 64, 64)), "3 channels"),
        (dict(image="picture.png"), "must be a PIL image"),
        (dict(height=0), "height must be a multiple of 8 and at least 16, got 0"),
        (dict(height=-64), "height must be .* got -64"),
        (dict(width=0), "width must be .* got 0"),
        (dict(width=True), "width must be .* got True"),
        (dict(seed=2**64), r"seeds must be integers in \[0, 2\*\*64 - 1\].* got 18446744073709551616"),
        (dict(seed=-1), "seeds must be integers in .* got -1"),
        (dict(seed=[0, 2**70], num_images=2), "seeds must be .* got 1180591620717411303424"),
        (dict(guidance=1e6), r"guidance must be a number in \[0, 100\], got 1000000.0"),
        (dict(guidance=float("inf")), "guidance must be"),
        (dict(guidance="7"), "guidance must be"),
        (dict(image=torch.rand(1, 3, 64, 64), steps=2, strength=0.3), "leaves no step to run"),
        (dict(image=torch.rand(1, 3, 0, 64)), "image is empty"),
        (dict(image=torch.full((1, 3, 64, 64), float("nan"))), "image has non-finite values"),
        (dict(image=np.zeros((64, 64, 5), "uint8")), "channels last.* got shape \\(64, 64, 5\\)"),
        (dict(image=np.zeros((64, 64, 3), "int64")), "uint8, uint16 or float, got dtype int64"),
        (dict(mask_image=torch.ones(1, 1, 64, 64)), "needs image="),
    ],
)
def test_bad_call_arguments(tiny, kwargs, match):
    kwargs = {**SIZE, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        tiny("a red sneaker", **kwargs)


@pytest.mark.parametrize(
    "what, picture",
    [
        ("image", torch.rand(1, 3, 64, 64)),  # smaller than asked: resized up
        ("image", torch.rand(1, 3, 96, 80)),  # another aspect ratio
        ("mask_image", torch.ones(1, 1, 32, 32)),
    ],
)
def test_pictures_of_another_size_are_resized_with_a_warning(tiny, caplog, what, picture):
    image = picture if what == "image" else torch.rand(1, 3, 128, 128)
    mask = picture if what == "mask_image" else None
    images = tiny("x", image=image, mask_image=mask, height=128, width=128, steps=2, output_type="pt")
    assert images.shape == (1, 3, 128, 128)
    assert f"{what} is {picture.shape[-1]}x{picture.shape[-2]}: resized to 128x128" in caplog.text


def test_large_picture_sets_a_size_near_the_models_default(tiny, caplog):
    # tiny's default is 64 px: a 1000x600 picture would be a 1000x600 run; it becomes 64x32 with a warning
    images = tiny("x", image=torch.rand(1, 3, 600, 1000), steps=2, output_type="pt")
    assert images.shape[-2:] == (32, 64)
    assert "image is 1000x600: resized to 64x32" in caplog.text


@pytest.mark.parametrize("dtype, scale", [("uint8", 255), ("float32", 1)])
def test_numpy_pictures_are_channels_last_like_diffusers(tiny, dtype, scale):
    picture = np.random.default_rng(0).random((64, 64, 3))
    as_array = tiny("x", image=(picture * scale).astype(dtype), steps=2, seed=1, output_type="pt")
    as_tensor = tiny("x", image=torch.from_numpy(picture).permute(2, 0, 1).float(), steps=2, seed=1,
                     output_type="pt")  # fmt: skip
    torch.testing.assert_close(as_array, as_tensor, atol=2e-2, rtol=0)


def test_steps_beyond_a_consistency_models_schedule_are_refused():
    pipe = diffrt.load("fashion-lcm")
    with pytest.raises(ValueError, match="steps must be at most 50 for this consistency model.* got 1000"):
        pipe("a coat", steps=1000)


def test_non_image_files_name_the_file(tmp_path):
    from diffrt.core.images import read_picture

    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match=f"image {text} is not an image file"):
        read_picture(text)
    with pytest.raises(FileNotFoundError, match="mask_image /no/such.png: no such file"):
        read_picture("/no/such.png", "mask_image")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_picture(tmp_path)  # a folder


def test_prompt_list_must_match_num_images(tiny):
    with pytest.raises(ValueError, match="prompt has 2 entries but 3 images"):
        tiny(["a", "b"], num_images=3, **SIZE)
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but 2"):
        tiny(["a", "b"], negative_prompt=["x", "y", "z"], **SIZE)
    with pytest.raises(ValueError, match="prompt must be a string"):
        tiny(42, **SIZE)


def test_checks_happen_before_heavy_work(tiny):
    calls = []
    run = tiny.backend.run
    tiny.backend.run = lambda graph, **inputs: calls.append(graph) or run(graph, **inputs)
    try:
        with pytest.raises(ValueError):
            tiny("a red sneaker", steps=2, sampler="dpmpp_2m", eta=1.0, **SIZE)
    finally:
        tiny.backend.run = run
    assert calls == []


def test_sampler_and_scheduler_are_exclusive(tiny):
    import diffusers

    with pytest.raises(ValueError, match="either sampler= or scheduler="):
        tiny("x", sampler="euler", scheduler=diffusers.EulerDiscreteScheduler(), **SIZE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device="tpu"), "device must be"),
        (dict(device="cuda"), "no CUDA GPU") if not torch.cuda.is_available() else (dict(dtype="x"), "dtype"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(dtype=torch.int8), "dtype must be one of"),
        (dict(backend="jax"), "unknown backend 'jax'; available: torch"),
        (dict(vae_precision="fp8"), "vae_precision"),
    ],
)
def test_bad_load_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffrt.load("tiny", **kwargs)


def test_missing_source():
    with pytest.raises(FileNotFoundError, match="neither an embedded model .*a preset .*sd15.* nor an existing folder"):
        diffrt.load("/no/such/model")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        diffrt.load(tmp_path)


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit_index(folder, **changes):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_unsupported_family_names_what_was_found(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    _edit_index(folder, _class_name="KandinskyPipeline")
    with pytest.raises(ValueError, match="unsupported model family 'KandinskyPipeline'"):
        diffrt.load(folder)


def test_pickle_only_weights_are_refused(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="only pickle weights"):
        diffrt.load(folder)


def test_truncated_weights_file_is_a_clear_error(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    weights = next((folder / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="could not load the vae"):
        diffrt.load(folder)


def test_config_missing_a_field_is_a_clear_error(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    del config["block_out_channels"]  # the weights no longer fit the default architecture
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="could not load the unet"):
        diffrt.load(folder)


def test_component_of_the_wrong_class(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    _edit_index(folder, unet=["diffusers", "UNet2DModel"])
    with pytest.raises(ValueError, match="unet is a UNet2DModel; diffrt supports UNet2DConditionModel"):
        diffrt.load(folder)


def test_inpainting_unet_needs_image_and_mask(tiny):
    from diffrt.models.components import Components
    from diffrt.pipeline.pipe import Pipeline

    class Config(dict):
        __getattr__ = dict.get

    class NineChannelUnet:
        config = Config(in_channels=9, block_out_channels=[32, 64], sample_size=8)

    c = tiny.components
    parts = Components("x", "sd", NineChannelUnet(), c.vae, c.text_encoders, c.tokenizers, c.scheduler)
    pipe = Pipeline(parts, tiny.backend, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="inpainting U-Net"):
        pipe("x", **SIZE)
