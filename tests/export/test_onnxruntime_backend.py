"""The onnxruntime backend: the same Pipeline on ONNX Runtime (CPU EP), its providers, options and errors."""

import logging

import numpy as np
import pytest
import torch

import diffrt
from diffrt.backends import create as create_backend
from diffrt.backends import onnxruntime_backend as orb

PROMPT = "a red sneaker"


@pytest.fixture(scope="module")
def ort_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ort-cache")


@pytest.fixture(scope="module")
def ort_tiny(ort_cache):
    return diffrt.load("tiny", device="cpu", backend="onnxruntime", cache_dir=ort_cache)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_whole_pipeline_matches_the_torch_backend_within_one_level(tiny, ort_tiny, sampler):
    kw = dict(steps=4, sampler=sampler, seed=7, num_images=2, output_type="np", height=64, width=48)
    expected, got = tiny(PROMPT, **kw), ort_tiny(PROMPT, **kw)
    assert got.shape == expected.shape == (2, 64, 48, 3)
    assert np.abs(got - expected).mean() <= 1 / 255


def test_a_step_cache_is_refused_on_the_exported_graph(ort_tiny):
    with pytest.raises(ValueError, match="cache= needs a torch-based backend .* the onnxruntime backend runs its "
                                         "exported graph whole"):  # fmt: skip
        ort_tiny(PROMPT, steps=2, cache="deepcache:interval=2")


def test_image_to_image_runs_the_vae_encoder(tiny, ort_tiny):
    picture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=3, seed=2, image=picture, strength=0.6, output_type="np")
    assert np.abs(ort_tiny(PROMPT, **kw) - tiny(PROMPT, **kw)).mean() <= 1 / 255


def test_sdxl_shaped_pipeline_matches_torch(tiny_sdxl, tmp_path):
    from diffrt.backends import create as create_backend
    from diffrt.pipeline.pipe import Pipeline

    components = tiny_sdxl.components
    runner = create_backend("onnxruntime", components, torch.device("cpu"), torch.float32, cache_dir=tmp_path)
    pipe = Pipeline(components, runner, torch.device("cpu"), torch.float32)
    kw = dict(steps=3, seed=1, num_images=2, output_type="np")
    assert np.abs(pipe("a cat", **kw) - tiny_sdxl("a cat", **kw)).mean() <= 1 / 255


def test_the_chosen_provider_is_logged(ort_cache, caplog):
    with caplog.at_level(logging.INFO, logger="diffrt.backends.onnxruntime_backend"):
        pipe = diffrt.load("tiny", device="cpu", backend="onnxruntime", cache_dir=ort_cache)
    assert "unet (fp32) runs on CPUExecutionProvider" in caplog.text
    assert pipe.backend.session_provider("unet") == "CPUExecutionProvider"


def test_provider_order_and_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert orb.choose_providers(cuda, available=everything) == everything
    assert orb.choose_providers(cuda, available=everything[1:]) == everything[1:]
    assert orb.choose_providers(cpu, available=everything) == ["CPUExecutionProvider"]
    assert orb.choose_providers(cuda, ["cuda"], available=everything) == everything[1:]
    with pytest.raises(ValueError, match="has no GPU execution provider.*onnxruntime-gpu"):
        orb.choose_providers(cuda, available=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="'tensorrt' is not available here; available: CPUExecutionProvider"):
        orb.choose_providers(cpu, ["tensorrt"], available=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="runs on the GPU: load with device='cuda'"):
        orb.choose_providers(cpu, ["CUDAExecutionProvider"], available=everything)
    with pytest.raises(ValueError, match="non-empty list"):
        orb.choose_providers(cpu, "cpu", available=everything)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype=torch.bfloat16), "ONNX Runtime has no torch.bfloat16 kernels"),
        (dict(precision="bf16"), "precision must be 'fp32' or 'fp16', got 'bf16'"),
        (dict(providers=["CUDAExecutionProvider"]), "not available here|runs on the GPU"),
        (dict(threads=0), "threads must be an integer >= 1"),
        (dict(colour="blue"), r"option\(s\) \['colour'\] do not apply to the onnxruntime backend"),
    ],
)
def test_unsupported_precisions_and_options_are_clear_errors(tiny, tmp_path, kwargs, message):
    dtype = kwargs.pop("dtype", torch.float32)
    with pytest.raises(ValueError, match=message):
        create_backend("onnxruntime", tiny.components, torch.device("cpu"), dtype, cache_dir=tmp_path, **kwargs)


def test_a_size_the_exported_unet_cannot_run_is_a_clear_error(ort_tiny):
    with pytest.raises(ValueError, match="height 72 is not a multiple of 16"):
        ort_tiny(PROMPT, steps=2, height=72, width=64)


def test_fp16_graphs_and_the_float32_vae_fallback(tiny, tmp_path):
    backend = create_backend("onnxruntime", tiny.components, torch.device("cpu"), torch.float32, precision="fp16",
                             cache_dir=tmp_path)
    latent = torch.randn(1, 4, 8, 8)
    assert backend.run("vae_decoder", latent=latent)["image"].dtype == torch.float16
    backend.upcast_vae()
    image = backend.run("vae_decoder", latent=latent)["image"]
    assert image.dtype == torch.float32
    expected = tiny.backend.run("vae_decoder", latent=latent)["image"]
    torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4)
    assert backend.run("unet", **_unet_inputs())["out"].dtype == torch.float16  # the U-Net stays fp16


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10.0, 10.0]),
                encoder_hidden_states=torch.randn(2, 77, 32, generator=g))  # fmt: skip


def test_load_from_an_export_folder(tiny, fp32_export, tmp_path):
    folder, _ = fp32_export
    pipe = diffrt.load("tiny", device="cpu", backend="onnxruntime", onnx_dir=folder, cache_dir=tmp_path / "unused")
    kw = dict(steps=2, seed=0, output_type="np")
    assert np.abs(pipe(PROMPT, **kw) - tiny(PROMPT, **kw)).mean() <= 1 / 255
    assert not (tmp_path / "unused" / "onnx").exists()
    with pytest.raises(ValueError, match="holds fp32 onnx graphs but precision 'fp16'"):
        diffrt.load("tiny", device="cpu", backend="onnxruntime", onnx_dir=folder, precision="fp16")


def test_unknown_graph_is_a_clear_error(ort_tiny):
    with pytest.raises(ValueError, match="unknown graph 'text_encoder_2'"):
        ort_tiny.backend.run("text_encoder_2", input_ids=torch.zeros(1, 77, dtype=torch.int64))


def test_tensorrt_ep_options_carry_the_export_profile(tmp_path):
    shapes = {"sample": [[1, 4, 2, 2], [2, 4, 8, 8], [8, 4, 16, 16]], "timestep": [[1], [2], [8]]}
    options = orb.provider_options("TensorrtExecutionProvider", shapes, "fp16", 1, tmp_path / "trt",
                                   {"trt_max_workspace_size": 2**30})  # fmt: skip
    assert options["trt_profile_min_shapes"] == "sample:1x4x2x2,timestep:1"
    assert options["trt_profile_opt_shapes"] == "sample:2x4x8x8,timestep:2"
    assert options["trt_profile_max_shapes"] == "sample:8x4x16x16,timestep:8"
    assert options["trt_fp16_enable"] == "true" and options["device_id"] == "1"
    assert (
        options["trt_engine_cache_path"] == str(tmp_path / "trt") and options["trt_max_workspace_size"] == "1073741824"
    )
    assert orb.provider_options("CPUExecutionProvider", shapes, "fp32", 0, tmp_path) == {}


def test_graphs_past_the_arena_limit_allocate_from_the_system(tiny, fp32_export, monkeypatch):
    """A CPU session's arena keeps what its runs allocated and grows by chunks (FLUX.1 at 1024 px was killed at
    24.5 GB beside its torch model, 19.7 GB at most without it): graphs with more weights than ARENA_LIMIT run
    without it, with the same images."""
    folder, manifest = fp32_export
    sizes = {g: r["onnx"]["bytes"] + (r.get("data") or {}).get("bytes", 0) for g, r in manifest["graphs"].items()}
    limit = (min(sizes.values()) + max(sizes.values())) // 2
    monkeypatch.setattr(orb, "ARENA_LIMIT", limit)
    pipe = diffrt.load("tiny", device="cpu", backend="onnxruntime", onnx_dir=folder)
    for graph, size in sizes.items():
        arena = pipe.backend.runner(graph).session.get_session_options().enable_cpu_mem_arena
        assert arena == (size <= limit), (graph, size, limit)
    kw = dict(steps=2, seed=0, output_type="np")
    assert np.abs(pipe(PROMPT, **kw) - tiny(PROMPT, **kw)).mean() <= 1 / 255
