"""The whole-loop capture path, proved on the CPU: a replay emulation (capture = keep the function and its
static buffers, replay = copy the new inputs in and call it again) returns what a CUDA-graph replay would. Each
mode runs two calls with different inputs through the captured path; each must equal an uncaptured call."""

import dataclasses
import logging

import diffusers
import pytest
import torch

import diffrt
from diffrt import samplers
from diffrt.backends.graphs import CapturedLoop, LoopGraphCache, ReplayEmulation

SIZE = dict(height=32, width=32, output_type="latent", progress=False)
DETERMINISTIC = [name for name in samplers.available() if not samplers.get(name).stochastic]


def captured_and_eager(pipe, calls, capture=ReplayEmulation):
    """Each call's latents through a capture (emulated by default), then uncaptured; and the cache."""
    cache = LoopGraphCache(max_graphs=8, capture=capture)
    pipe.backend.loop_capture = cache
    try:
        replayed = [pipe(**call) for call in calls]
    finally:
        pipe.backend.loop_capture = None
    eager = [pipe(**call) for call in calls]
    return replayed, eager, cache


def assert_same(replayed, eager):
    for k, (ours, reference) in enumerate(zip(replayed, eager, strict=True)):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6, msg=lambda m, k=k: f"call {k}: {m}")


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("guidance", [dict(guidance=0.0), dict(guidance=5.0), dict(guidance=5.0, guidance_rescale=0.7)])
def test_text_to_image_replays_equal_eager(tiny, sampler, guidance):
    calls = [dict(prompt="a red sneaker", seed=1), dict(prompt="a blue bag", seed=7)]
    calls = [{**c, "steps": 3, "sampler": sampler, **guidance, **SIZE} for c in calls]
    replayed, eager, cache = captured_and_eager(tiny, calls)
    assert cache.captures == 1  # the second call replayed the first one's graph...
    assert_same(replayed, eager)  # ...with its own inputs


def test_image_to_image_and_inpainting_replay_their_own_pictures(tiny):
    images = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    masks = [torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)]
    masks[0][..., :16, :] = 1
    masks[1][..., :, 8:] = 1
    for with_mask in (False, True):
        calls = [dict(prompt="a coat", image=images[k], mask_image=masks[k] if with_mask else None, strength=0.75,
                      steps=4, sampler="dpmpp_2m", seed=k, **SIZE) for k in range(2)]  # fmt: skip
        replayed, eager, _ = captured_and_eager(tiny, calls)
        assert_same(replayed, eager)


def nine_channel(tiny):
    """tiny with a seeded 9-channel (inpainting) U-Net."""
    from diffrt.pipeline.pipe import Pipeline

    config = {k: v for k, v in tiny.components.unet.config.items() if not k.startswith("_")}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**{**config, "in_channels": 9}).eval()
    parts = dataclasses.replace(tiny.components, unet=unet)
    return Pipeline(parts, diffrt.backends.create("torch", parts, torch.device("cpu"), torch.float32),
                    torch.device("cpu"), torch.float32)  # fmt: skip


def test_a_nine_channel_unet_replays_each_calls_masked_image(tiny):
    pipe = nine_channel(tiny)
    images = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    masks = [torch.ones(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)]
    masks[1][..., 4:20, 4:20] = 1
    calls = [dict(prompt="x", image=images[k], mask_image=masks[k], steps=3, sampler="euler", seed=3, **SIZE)
             for k in range(2)]  # fmt: skip
    replayed, eager, cache = captured_and_eager(pipe, calls)
    assert cache.captures == 1
    assert_same(replayed, eager)


def test_differently_configured_schedulers_never_share_a_graph(tiny):
    config = tiny.components.scheduler.config
    first = diffusers.DPMSolverMultistepScheduler.from_config(config, solver_type="midpoint")
    second = diffusers.DPMSolverMultistepScheduler.from_config(config, solver_type="heun")
    calls = [dict(prompt="a boot", scheduler=s, steps=4, seed=2, **SIZE) for s in (first, second)]
    replayed, eager, cache = captured_and_eager(tiny, calls)
    assert cache.captures == 2
    assert not torch.equal(eager[0], eager[1])  # the two configurations do differ
    assert_same(replayed, eager)


def test_stochastic_samplers_run_eagerly_and_say_so(caplog):
    pipe = diffrt.load("fashion-lcm")
    calls = [dict(prompt="a bag", seed=k, steps=2, **SIZE) for k in range(2)]
    with caplog.at_level(logging.INFO, logger="diffrt"):
        replayed, eager, cache = captured_and_eager(pipe, calls)
    assert cache.captures == 0
    assert "sampler lcm draws noise per step: its loop runs eagerly" in caplog.text
    assert_same(replayed, eager)


def test_the_cache_evicts_the_least_recently_used_graph():
    cache = LoopGraphCache(max_graphs=2, capture=ReplayEmulation)
    x = torch.zeros(2)

    def times(k):
        return lambda x: x + k

    for key in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        cache.run(key, times(ord(key)), {"x": x})
    assert cache.captures == 3 and len(cache) == 2
    assert float(cache.run("a", times(0), {"x": x})[0]) == ord("a")  # still cached: its own function
    assert float(cache.run("b", times(ord("b")), {"x": x})[0]) == ord("b") and cache.captures == 4
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1"):
        LoopGraphCache(max_graphs=0)


def test_plan_keys_are_host_side_and_tell_options_apart():
    from diffrt.core.schedules import VPSchedule, vp_grid

    grid = vp_grid(VPSchedule.scaled_linear(), 6)
    keys = {samplers.prepare("unipc", grid, "cpu", torch.float32, variant=v).host_key for v in ("bh1", "bh2")}
    assert len(keys) == 2
    same = {samplers.prepare("dpmpp_2m", grid, "cpu", torch.float32).host_key for _ in range(2)}
    assert len(same) == 1


@pytest.mark.gpu
def test_real_cuda_graphs_replay_like_the_emulation():
    pipe = diffrt.load("tiny", device="cuda", dtype="float32")
    config = pipe.components.scheduler.config
    dpm = diffusers.DPMSolverMultistepScheduler
    schedulers = [dpm.from_config(config, solver_type=kind) for kind in ("midpoint", "heun")]
    calls = [dict(prompt=p, seed=k, steps=4, sampler="dpmpp_2m", guidance=5.0, **SIZE)
             for k, p in enumerate(("a red sneaker", "a blue bag"))]  # fmt: skip
    calls += [dict(prompt="a boot", scheduler=s, steps=4, seed=2, **SIZE) for s in schedulers]
    replayed, eager, cache = captured_and_eager(pipe, calls, capture=CapturedLoop)
    assert cache.captures == 3  # one for the sampler calls, one per scheduler configuration
    for ours, reference in zip(replayed, eager, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)  # TF32/kernel choice may differ slightly


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny-sd3"])
def test_transformer_families_replay_equal_eager(preset):
    """The captured loop holds a transformer as it holds a U-Net: FLUX.1-dev's guidance input and SD3's CFG
    branch are per-call graph inputs like the prompt's states."""
    pipe = diffrt.load(preset, device="cpu")
    calls = [dict(prompt="a red sneaker", seed=1, guidance=3.5), dict(prompt="a blue bag", seed=7, guidance=5.0)]
    calls = [{**c, "steps": 3, "sampler": "dpmpp_2m", "height": 32, "width": 48, "output_type": "latent",
              "progress": False} for c in calls]  # fmt: skip
    replayed, eager, cache = captured_and_eager(pipe, calls)
    assert_same(replayed, eager)
    # FLUX.1-dev: one pass per step whatever the guidance, so both calls share one graph; SD3's guidance
    # scale is part of the key (a host constant of the loop): two graphs
    assert cache.captures == (1 if preset == "tiny-flux" else 2)
