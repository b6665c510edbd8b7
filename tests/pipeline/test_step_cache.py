"""Step caching (diffrt.core.step_cache): the config and its schedule, DeepCache's and the first-block cache's passes
against the models' own forward, the pipeline under a cache (tally, parity at the no-skip settings, capture
replay), and the bad input each refuses."""

import json
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel

import diffrt
from diffrt.backends.graphs import LoopGraphCache, ReplayEmulation
from diffrt.cli import main
from diffrt.core import step_cache
from diffrt.core.step_cache import CacheConfig, parse
from diffrt.models.families import unet_cache
from diffrt.models.families.base import UNetGraph

SMALL = dict(height=32, width=32, output_type="latent", progress=False)


# ---------------------------------------------------------------------------------------------- the config
def test_specs_parse_with_defaults_and_print_back():
    assert parse("deepcache") == CacheConfig("deepcache", interval=3)
    assert parse("deepcache:interval=4,depth=2,warmup=2") == CacheConfig("deepcache", interval=4, depth=2, warmup=2)
    assert parse("fbcache") == CacheConfig("fbcache", threshold=0.1)
    assert parse(" fbcache:interval=2 ") == CacheConfig("fbcache", interval=2)
    assert parse("deepcache:depth=2") == CacheConfig("deepcache", interval=3, depth=2)
    assert parse("fbcache:warmup=2") == CacheConfig("fbcache", threshold=0.1, warmup=2)
    assert parse(None) is None
    for spec in ("deepcache:interval=4,depth=2", "fbcache:threshold=0.25", "fbcache:interval=2,warmup=3"):
        assert str(parse(spec)) == spec and parse(str(parse(spec))) == parse(spec)
    assert parse("fbcache:interval=2").static and not parse("fbcache:threshold=0.2").static


@pytest.mark.parametrize("spec, message", [
    ("teacache", "unknown cache kind 'teacache'"),
    ("deepcache:interval=0", "interval must be an integer >= 1, got 0"),
    ("deepcache:interval=two", "interval must be an integer, got 'two'"),
    ("deepcache:threshold=0.1", "takes interval=, depth=, warmup="),
    ("deepcache:depth=0,interval=2", "depth must be an integer >= 1, got 0"),
    ("fbcache:threshold=-0.1", "threshold must be a number >= 0, got -0.1"),
    ("fbcache:threshold=0.1,interval=2", "not both"),
    ("fbcache:depth=2", "takes threshold=, interval=, warmup="),
    ("deepcache:interval", "bad cache option 'interval'"),
    (3, "got int"),
])  # fmt: skip
def test_bad_specs_name_the_value_and_what_is_allowed(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(spec)


def test_a_config_needs_its_schedule_when_built_directly():
    with pytest.raises(ValueError, match="not both and not neither"):
        CacheConfig("fbcache")
    with pytest.raises(ValueError, match="deepcache needs interval="):
        CacheConfig("deepcache")


def test_fixed_schedule_computes_the_first_warmup_every_interval_and_last_call():
    config = parse("deepcache:interval=3")
    full = [i for i in range(20) if step_cache.is_scheduled_full(config, i, 20)]
    assert full == [0, 3, 6, 9, 12, 15, 18, 19]
    warm = parse("deepcache:interval=3,warmup=5")
    assert [i for i in range(10) if step_cache.is_scheduled_full(warm, i, 10)] == [0, 1, 2, 3, 4, 6, 9]
    assert step_cache.static_full_calls(config, 20) == 8
    assert step_cache.static_full_calls(parse("deepcache:interval=1"), 7) == 7


# ---------------------------------------------------------------------------------- the models' passes
def sdxl_like_unet():
    """SDXL's added conditioning, two layers per block, attention-free outer blocks: the layer bookkeeping."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
        attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8, transformer_layers_per_block=(1, 2, 1),
    ).eval()  # fmt: skip


def unet_inputs(batch=3, size=(8, 16)):
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(batch, 4, *size, generator=g), timestep=torch.tensor([900.0, 450.0, 3.0]),
                encoder_hidden_states=torch.randn(batch, 7, 24, generator=g),
                text_embeds=torch.randn(batch, 24, generator=g), time_ids=torch.rand(batch, 6, generator=g) * 64)


@torch.inference_mode()
def test_deepcache_full_pass_is_the_unet_and_partial_on_its_feature_gives_it_back_at_every_depth():
    graph = UNetGraph(sdxl_like_unet())
    inputs = unet_inputs()
    reference = graph(**inputs)
    depths = unet_cache.skip_count(graph.unet)
    assert depths == 1 + 2 * 3 + 2
    moved = {**inputs, "sample": inputs["sample"] + 0.3}
    for depth in range(1, depths + 1):
        out, feature = graph.deep_full(depth, **inputs)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(graph.deep_partial(depth, feature, **inputs), reference, rtol=0, atol=1e-6)
        # on other inputs the outer layers are fresh and the deep feature is the kept one: not the full output
        stale = graph.deep_partial(depth, feature, **moved)
        assert not torch.allclose(stale, graph(**moved), atol=1e-4)


def test_deepcache_refuses_a_depth_the_unet_lacks_and_blocks_it_does_not_cover():
    unet = sdxl_like_unet()
    with pytest.raises(ValueError, match="deepcache depth 10 is more than this U-Net's 9 skip connections"):
        unet_cache.check(unet, 10)
    unet.up_blocks[0] = torch.nn.Identity()
    with pytest.raises(ValueError, match="this U-Net has a Identity"):
        unet_cache.check(unet, 1)


@pytest.fixture(scope="module")
def fashion():
    return diffrt.load("fashion", device="cpu")


@pytest.fixture(scope="module")
def fashion_dit():
    return diffrt.load("fashion-dit", device="cpu")


@pytest.mark.parametrize("model", ["fashion-dit", "tiny-flux", "tiny-sd3"])
@torch.inference_mode()
def test_first_block_pieces_compose_to_the_transformer(model, fashion_dit):
    pipe = fashion_dit if model == "fashion-dit" else diffrt.load(model, device="cpu")
    graph = pipe.backend.modules["transformer"]
    spec = pipe.backend.specs["transformer"]
    g = torch.Generator().manual_seed(2)
    inputs = {}
    sizes = dict(batch=3, height=32, width=48, sequence=9)  # latents 4x6: FLUX's 2x2 patches, SD3's patch 2
    for t in spec.inputs:
        inputs[t.name] = torch.rand(t.shape(sizes), generator=g) * (900 if t.name == "timestep" else 1)
    if "guidance" in inputs:
        inputs["guidance"] = torch.full((3,), 3.5)
    before, after, carry = graph.first_block(**inputs)
    out = graph.finish(graph.other_blocks(after, carry), carry)
    torch.testing.assert_close(out, graph(**inputs), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- the pipeline
def test_deepcache_in_the_pipeline_tallies_its_calls_and_stays_near_the_uncached_image(fashion):
    call = dict(prompt=["a dress", "a sneaker"], seed=3, output_type="pt", progress=False)
    plain = fashion.generate(**call)
    cached = fashion.generate(**call, cache="deepcache:interval=3")
    assert (cached.stages.full_calls, cached.stages.cached_calls) == (8, 12)  # 20 dpmpp_2m steps
    assert "step cache: 8 full, 12 cached" in cached.stages.summary()
    assert plain.stages.full_calls is None
    difference = (cached.images - plain.images).abs().mean().item()
    assert 0 < difference < 0.05, difference  # the same garment, not the same pixels
    # interval 1 computes every call through the layered pass: the uncached image, bit for bit
    every = fashion.generate(**call, cache="deepcache:interval=1")
    assert torch.equal(every.images, plain.images)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "unipc"])
def test_the_last_model_call_is_full_for_multi_call_samplers(fashion, sampler):
    result = fashion.generate("a bag", sampler=sampler, steps=5, cache="deepcache:interval=100", **SMALL)
    calls = len(result.stages.unet_calls_ms)
    assert result.stages.full_calls + result.stages.cached_calls == calls
    assert result.stages.full_calls == 2  # the first and the last


def test_image_to_image_counts_only_the_steps_it_runs(tiny):
    picture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=10, strength=0.5, image=picture, seed=1, output_type="pt", progress=False)
    result = tiny.generate("a coat", cache="deepcache:interval=2", **kw)
    assert (result.stages.full_calls, result.stages.cached_calls) == (3, 2)  # 5 steps left: 0, 2, 4 full
    assert 0 < (result.images - tiny("a coat", **kw)).abs().mean() < 0.05


def test_first_block_cache_thresholds_bound_what_it_skips(fashion_dit):
    call = dict(prompt="a coat", seed=5, steps=12, **SMALL)
    plain = fashion_dit(**call)
    never = fashion_dit.generate(**call, cache="fbcache:threshold=0")  # every change counts: all calls full
    assert never.stages.cached_calls == 0 and torch.equal(never.images, plain)
    always = fashion_dit.generate(**call, cache="fbcache:threshold=1000,warmup=2")
    assert (always.stages.full_calls, always.stages.cached_calls) == (3, 9)  # two warm-up calls and the last
    fixed = fashion_dit.generate(**call, cache="fbcache:interval=2")
    assert (fixed.stages.full_calls, fixed.stages.cached_calls) == (7, 5)
    middle = fashion_dit.generate(**call, cache="fbcache:threshold=0.3")
    assert 0 < middle.stages.cached_calls < 9
    assert 0 < (middle.images - plain).abs().mean() < (always.images - plain).abs().mean()


def test_a_fixed_schedule_replays_in_the_captured_loop_and_keys_its_graph(fashion, caplog):
    calls = [dict(prompt="a shirt", seed=1, steps=6, cache="deepcache:interval=2", **SMALL),
             dict(prompt="a boot", seed=2, steps=6, cache="deepcache:interval=2", **SMALL),
             dict(prompt="a boot", seed=2, steps=6, cache="deepcache:interval=3", **SMALL)]  # fmt: skip
    fashion.backend.loop_capture = capture = LoopGraphCache(capture=ReplayEmulation)
    try:
        replayed = [fashion(**call) for call in calls]
        tally = fashion.generate(**calls[0]).stages
        adaptive = diffrt.load("fashion-dit", device="cpu")
        adaptive.backend.loop_capture = LoopGraphCache(capture=ReplayEmulation)
        with caplog.at_level(logging.INFO, logger="diffrt"):
            adaptive(prompt="a bag", steps=4, cache="fbcache:threshold=0.2", **SMALL)
        assert adaptive.backend.loop_capture.captures == 0  # it decides on the host: eager, and says so
        assert "step cache fbcache:threshold=0.2 decides on the host at each call: its loop runs eagerly" in caplog.text
    finally:
        fashion.backend.loop_capture = None
    assert capture.captures == 2  # one graph per cache setting
    assert (tally.full_calls, tally.cached_calls) == (4, 2)
    for ours, call in zip(replayed, calls, strict=True):
        torch.testing.assert_close(ours, fashion(**call), rtol=0, atol=1e-6)


def test_a_cache_for_the_wrong_family_or_backend_is_refused_before_any_work(fashion, fashion_dit):
    with pytest.raises(ValueError, match="cache kind 'fbcache' is for transformers; U-Nets \\(sd\\) take deepcache"):
        fashion("a bag", cache="fbcache:threshold=0.1")
    with pytest.raises(ValueError, match="cache kind 'deepcache' is for U-Nets; transformers \\(flux\\) take fbcache"):
        fashion_dit("a bag", cache="deepcache:interval=2")
    with pytest.raises(ValueError, match="depth 7 is more than this U-Net's 6 skip connections"):
        fashion("a bag", cache="deepcache:interval=2,depth=7")
    with pytest.raises(ValueError, match="unknown cache kind 'deep'"):
        list(fashion.generate_batches("a bag", cache="deep"))


def test_cli_generate_takes_a_cache_and_names_a_bad_one(tmp_path, capsys):
    out = tmp_path / "bag.png"
    assert main(["generate", "a bag", "--model", "fashion-lcm", "--cache", "deepcache:interval=2", "-o", str(out)]) == 0
    assert out.is_file() and "step cache: 3 full, 1 cached" in capsys.readouterr().out
    assert main(["generate", "a bag", "--model", "fashion-lcm", "--cache", "deepcache:every=2", "-o", str(out)]) == 2
    assert "bad cache option 'every=2'" in capsys.readouterr().err


def test_bench_cache_writes_cells_a_front_and_verdicts(tmp_path, capsys):
    out = tmp_path / "cache.json"
    code = main(["bench", "cache", "--model", "fashion", "--steps", "6", "--cache", "deepcache:interval=2",
                 "--fewer-steps", "3", "--samples", "10", "--repeats", "1", "--timing-images", "2", "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    cells = {c["label"]: c for c in record["metrics"]["cells"]}
    assert list(cells) == ["6 steps", "deepcache:interval=2", "3 steps"]
    assert (cells["deepcache:interval=2"]["full_calls"], cells["deepcache:interval=2"]["cached_calls"]) == (4, 2)
    assert cells["6 steps"]["denoise_speedup"] == 1.0 and cells["3 steps"]["full_calls"] == 3
    for cell in cells.values():
        assert 0 <= cell["adherence"] <= 1 and cell["fid"] > 0 and isinstance(cell["pareto"], bool)
    assert set(record["metrics"]["verdicts"]) == {"deepcache:interval=2"}
    assert (tmp_path / "cache.png").is_file()
    assert main(["bench", "cache", "--model", "fashion", "--fewer-steps", "25", "--out", str(out)]) == 2
    assert "--fewer-steps must be step counts from 1 to 19" in capsys.readouterr().err
