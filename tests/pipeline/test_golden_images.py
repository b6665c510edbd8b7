"""Bit-identical images on the torch backend: hashes recorded before the architecture rework (issue 12).

Every case runs a whole pipeline call through the public API (txt2img, img2img, inpainting; the tiny preset, the
embedded models, a tiny SDXL folder and a 9-channel inpainting U-Net) and hashes the float32 output bytes. The
hashes were recorded on the code as it was before the rework, so any change of the computed numbers fails here.

Float results depend on the CPU kernels and the thread count: the hashes hold for the recorded torch version,
CPU capability and CPU model (the same code gives other bits on an Intel Xeon than on an AMD EPYC: measured),
so there is one record per machine kind; the test runs with the record's thread count and skips, saying why,
on a machine no record matches. The AMD EPYC record is the one made before the rework (it passed on that
machine kind through the reworks); the Intel Xeon one was added on 2026-12-03 from the code as it was then.
Record this machine's kind (only when it has no record, or when a change of the numbers is intended):
``python tests/pipeline/test_golden_images.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HASHES = Path(__file__).with_name("golden_images.json")
PROMPTS = ["an ankle boot", "a bag"]
SEEDS = [3, 4]


def _picture(size: int, seed: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(size: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 :] = 1
    return mask


def _tiny_sdxl_folder(root: Path) -> Path:
    """A tiny SDXL folder written by diffusers itself (seeded random weights)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffrt.core.text import character_clip_tokenizer

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=77, vocab_size=1000, bos_token_id=998, eos_token_id=999, pad_token_id=999)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                  latent_channels=4, sample_size=64, scaling_factor=0.13025)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)),
        tokenizer=character_clip_tokenizer(1000), tokenizer_2=character_clip_tokenizer(1000), unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012, timestep_spacing="trailing"),
    )  # fmt: skip
    pipe.save_pretrained(root / "tiny-sdxl", safe_serialization=True)
    return root / "tiny-sdxl"


def _inpainting_folder(root: Path) -> Path:
    """The tiny preset's parts with a seeded 9-channel inpainting U-Net, written by diffusers."""
    import diffusers

    import diffrt
    from diffrt.models.presets import PRESETS

    tiny = diffrt.load("tiny", device="cpu").components
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**PRESETS["tiny"].unet, "in_channels": 9}).eval()
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoders[0], tokenizer=tiny.tokenizers[0], unet=unet,
        scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "tiny-inpaint", safe_serialization=True)
    return root / "tiny-inpaint"


def cases(root: Path) -> dict:
    """name -> (model source, size, call keyword arguments)."""
    out = {}
    for model, size in (("tiny", 64), ("fashion", 32), ("fashion-flow", 32), ("fashion-lcm", 32)):
        base = dict(seed=SEEDS)
        out[f"{model}/txt2img"] = (model, size, base)
        out[f"{model}/img2img"] = (model, size, dict(base, image=_picture(size, 1), strength=0.6))
        out[f"{model}/inpaint"] = (model, size, dict(base, image=_picture(size, 2), mask_image=_mask(size)))
    out["tiny/negative+rescale"] = ("tiny", 64, dict(seed=SEEDS, negative_prompt="blurry", guidance_rescale=0.7))
    out["tiny/guidance-off"] = ("tiny", 64, dict(seed=SEEDS, guidance=1.0, sampler="unipc", steps=5))
    out["tiny/ancestral"] = ("tiny", 64, dict(seed=SEEDS, sampler="dpmpp_2m_sde", steps=4))
    out["fashion/scheduler"] = ("fashion", 32, dict(seed=SEEDS, steps=6, scheduler="dpm_karras"))
    # these folders have no diffrt.json: since issue 33 they default to their own scheduler and their pipeline's
    # guidance, so the settings they were recorded with (diffrt's built-in defaults then) are named here
    sdxl, then = str(_tiny_sdxl_folder(root)), dict(seed=SEEDS, sampler="dpmpp_2m")
    out["tiny-sdxl/txt2img"] = (sdxl, 64, dict(seed=SEEDS, steps=3, sampler="euler", guidance=5.0))
    out["tiny-sdxl/negative"] = (sdxl, 64, dict(then, steps=3, negative_prompt="blurry", guidance=5.0))
    out["tiny-sdxl/img2img"] = (sdxl, 64, dict(then, steps=4, image=_picture(64, 3), strength=0.5, guidance=7.5))
    inpaint = str(_inpainting_folder(root))
    out["tiny-inpaint9/inpaint"] = (inpaint, 64, dict(then, steps=3, image=_picture(64, 4), mask_image=_mask(64),
                                                      guidance=3.0))  # fmt: skip
    return out


def _scheduler(name: str):
    import diffusers

    if name == "dpm_karras":
        return diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012, use_karras_sigmas=True)  # fmt: skip
    raise ValueError(name)


def run_case(pipes: dict, source: str, size: int, kwargs: dict) -> np.ndarray:
    import diffrt

    if source not in pipes:
        pipes[source] = diffrt.load(source, device="cpu", dtype=torch.float32)
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("scheduler"), str):
        kwargs["scheduler"] = _scheduler(kwargs["scheduler"])
    images = pipes[source](PROMPTS, height=size, width=size, output_type="np", progress=False, **kwargs)
    return np.ascontiguousarray(images, dtype=np.float32)


def digest(images: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes()).hexdigest()


def environment() -> dict:
    from diffrt.core.results import cpu_model

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu_model()}  # fmt: skip


def record(root: Path) -> dict:
    pipes: dict = {}
    hashes = {name: digest(run_case(pipes, *case)) for name, case in cases(root).items()}
    return {"env": environment(), "threads": torch.get_num_threads(), "hashes": hashes}


def records() -> list[dict]:
    return json.loads(HASHES.read_text())["records"] if HASHES.is_file() else []


@pytest.fixture(scope="module")
def recorded():
    stored = next((r for r in records() if r["env"] == environment()), None)
    if stored is None:
        pytest.skip(f"hashes recorded for {[r['env'] for r in records()]}; this machine has {environment()}")
    threads = torch.get_num_threads()
    torch.set_num_threads(stored["threads"])
    yield stored
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def all_cases(tmp_path_factory):
    return cases(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="module")
def pipes():
    return {}


def test_every_recorded_case_is_still_run():
    assert records() and all(sorted(r["hashes"]) == sorted(cases_names()) for r in records())
    assert len(cases_names()) == 20


def cases_names() -> list[str]:
    return sorted(records()[0]["hashes"]) if records() else []


@pytest.mark.parametrize("name", cases_names())
def test_images_are_bit_identical_to_the_recorded_ones(recorded, all_cases, pipes, name):
    assert digest(run_case(pipes, *all_cases[name])) == recorded["hashes"][name]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = record(Path(tmp))
    kept = [r for r in records() if r["env"] != result["env"]]
    HASHES.write_text(json.dumps({"records": [*kept, result]}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(result['hashes'])} hashes for {result['env']} to {HASHES}", file=sys.stderr)
