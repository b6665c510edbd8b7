"""TensorRT: what runs without it (install errors, engine keys, profiles, manifests) and, where TensorRT
and a GPU exist, engine parity with torch."""

import importlib.util

import numpy as np
import pytest
import torch

import diffrt
from diffrt.backends import availability, create
from diffrt.export import ShapeRanges, graph_profile, graph_specs, input_profile_shapes, model_hash, tensorrt, trt_build

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_missing_tensorrt_is_a_clear_error_naming_the_install(tiny):
    with pytest.raises(ValueError, match=r"TensorRT is not installed: pip install tensorrt"):
        tensorrt.import_tensorrt()
    assert "pip install tensorrt" in availability()["tensorrt"]
    with pytest.raises(ValueError, match="backend 'tensorrt' cannot run here: .*pip install tensorrt"):
        create("tensorrt", tiny.components, torch.device("cpu"), torch.float32)


def test_engine_precisions_and_their_onnx_sources():
    assert trt_build.onnx_precision_for("fp16") == "fp16"
    assert trt_build.onnx_precision_for("bf16") == "fp32"
    assert trt_build.onnx_precision_for("fp32") == "fp32"
    with pytest.raises(ValueError, match=r"TensorRT precision must be one of \('fp32', 'fp16', 'bf16'\), got 'int8'"):
        trt_build.onnx_precision_for("int8")


def test_engine_keys_change_with_everything_an_engine_depends_on(tiny):
    ranges = ShapeRanges().resolved(tiny.components)
    versions = {"tensorrt": "10.9.0", "torch": "2.13.0"}
    device = {"gpu": "NVIDIA H100", "capability": "9.0", "cuda": "12.8"}
    h = model_hash(tiny.components)
    base = trt_build.engine_key(h, "fp16", ranges, versions, device, False)
    assert base == trt_build.engine_key(h, "fp16", ranges, dict(versions), dict(device), False)
    variants = [
        trt_build.engine_key("0" * 64, "fp16", ranges, versions, device, False),
        trt_build.engine_key(h, "bf16", ranges, versions, device, False),
        trt_build.engine_key(
            h, "fp16", ShapeRanges(batch=(1, 1, 8)).resolved(tiny.components), versions, device, False
        ),  # fmt: skip
        trt_build.engine_key(h, "fp16", ranges, {**versions, "tensorrt": "10.10.0"}, device, False),
        trt_build.engine_key(h, "fp16", ranges, versions, {**device, "capability": "8.9"}, False),
        trt_build.engine_key(h, "fp16", ranges, versions, device, True),
    ]
    assert len({base, *variants}) == 7


def test_engine_profiles_from_the_specs(tiny):
    specs = graph_specs(tiny.components)
    ranges = ShapeRanges(batch=(1, 2, 4), height=(32, 64, 96), width=(32, 64, 96)).resolved(tiny.components)
    unet = input_profile_shapes(specs["unet"], graph_profile(specs["unet"], ranges))
    assert unet == {
        "sample": ((1, 4, 4, 4), (4, 4, 8, 8), (8, 4, 12, 12)),
        "timestep": ((1,), (4,), (8,)),
        "encoder_hidden_states": ((1, 1, 32), (4, 77, 32), (8, 77, 32)),
    }
    text = input_profile_shapes(specs["text_encoder"], graph_profile(specs["text_encoder"], ranges))
    assert text == {"input_ids": ((1, 1), (2, 77), (4, 77))}
    encoder = input_profile_shapes(specs["vae_encoder"], graph_profile(specs["vae_encoder"], ranges))
    assert encoder == {"image": ((1, 3, 32, 32), (2, 3, 64, 64), (4, 3, 96, 96))}


def test_the_onnx_manifest_carries_the_engine_profiles(fp32_export):
    _, manifest = fp32_export
    unet = manifest["graphs"]["unet"]
    assert unet["profile"] == {"batch": [1, 2, 8], "height": [16, 64, 128], "width": [16, 64, 128],
                               "sequence": [1, 77, 77]}  # fmt: skip
    assert unet["profile_shapes"]["sample"] == [[1, 4, 2, 2], [2, 4, 8, 8], [8, 4, 16, 16]]


def test_open_engines_refuses_folders_that_are_not_engine_builds(tmp_path, fp32_export):
    folder, _ = fp32_export
    with pytest.raises(ValueError, match="not a diffrt TensorRT build"):
        trt_build.open_engines(folder)
    with pytest.raises(ValueError, match="not a diffrt TensorRT build"):
        trt_build.open_engines(tmp_path)


# ------------------------------------------------------------------------- where TensorRT and a GPU exist
@pytest.fixture(scope="module")
def gpu_pipes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("trt-cache")
    reference = diffrt.load("tiny", device="cuda", dtype="float32")
    engines = diffrt.load("tiny", device="cuda", dtype="float32", backend="tensorrt", cache_dir=cache)
    return reference, engines, cache


@pytest.mark.tensorrt
def test_fp32_engines_match_torch_graph_by_graph(gpu_pipes):
    reference, engines, _ = gpu_pipes
    torch.backends.cudnn.allow_tf32 = False
    for name, spec in graph_specs(reference.components).items():
        for batch, size in ((1, 32), (3, 64)):
            values = {"batch": batch, "height": size, "width": size, "sequence": 77}
            inputs = spec.sample_inputs(values, generator=torch.Generator().manual_seed(batch), device="cuda")
            expected = reference.backend.run(name, **inputs)
            got = engines.backend.run(name, **inputs)
            for out in spec.output_names:
                err = (got[out].float() - expected[out].float()).abs().max() / expected[out].abs().max()
                assert err <= 1e-3, (name, batch, size, out, float(err))


@pytest.mark.tensorrt
def test_engine_pipeline_matches_torch_and_refuses_shapes_outside_its_profile(gpu_pipes):
    reference, engines, _ = gpu_pipes
    kw = dict(steps=4, seed=3, num_images=2, output_type="np")
    assert np.abs(engines("a red sneaker", **kw) - reference("a red sneaker", **kw)).mean() <= 1 / 255
    with pytest.raises(ValueError, match="outside the engine's optimization profile"):
        engines("a red sneaker", steps=2, height=256, width=64)


@pytest.mark.tensorrt
def test_fp16_engines_and_cuda_graphs(tmp_path):
    reference = diffrt.load("tiny", device="cuda", dtype="float32")
    engines = diffrt.load("tiny", device="cuda", dtype="float16", backend="tensorrt", cache_dir=tmp_path,
                          cuda_graphs=True)  # fmt: skip
    kw = dict(steps=4, seed=3, num_images=2, output_type="np")
    first = engines("a red sneaker", **kw)
    assert np.abs(first - engines("a red sneaker", **kw)).mean() <= 1e-3  # replayed graphs: the same images
    assert np.abs(first - reference("a red sneaker", **kw)).mean() <= 4 / 255


@pytest.mark.tensorrt
def test_a_corrupt_engine_is_rebuilt(gpu_pipes):
    _, engines, cache = gpu_pipes
    folder, manifest = engines.backend.folder("fp32")
    path = folder / manifest["graphs"]["vae_decoder"]["engine"]["file"]
    path.write_bytes(path.read_bytes()[:1000])
    folder2, repaired = trt_build.ensure_engines(engines.components, precision="fp32", cache_dir=cache,
                                                 graphs=["vae_decoder"])  # fmt: skip
    assert folder2 == folder and repaired["graphs"]["vae_decoder"]["engine"]["bytes"] > 1000
