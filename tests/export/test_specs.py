"""Export specs: graph IO against the torch backend, engine profile derivation, input checks."""

import pytest
import torch

from diffrt.export import ShapeRanges, graph_profile, graph_specs, input_profile_shapes

VALUES = {"batch": 2, "height": 32, "width": 48, "sequence": 77}


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_specs_name_exactly_what_the_torch_backend_takes_and_returns(model, request):
    pipe = request.getfixturevalue(model)
    specs = graph_specs(pipe.components)
    expected = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    if model == "tiny_sdxl":
        expected.insert(1, "text_encoder_2")
    assert list(specs) == expected
    for name, spec in specs.items():
        inputs = spec.sample_inputs(VALUES, generator=torch.Generator().manual_seed(0))
        out = pipe.backend.run(name, **inputs)
        assert sorted(out) == sorted(spec.output_names), name
        for output, shape in spec.output_shapes(VALUES).items():
            assert tuple(out[output].shape) == shape, (name, output)


def test_sdxl_specs_have_pooled_and_size_conditioning(tiny_sdxl):
    specs = graph_specs(tiny_sdxl.components)
    assert specs["text_encoder"].output_names == ["hidden"]
    assert specs["text_encoder_2"].output_names == ["hidden", "pooled"]
    assert specs["unet"].input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]


def test_dynamic_axes_cover_batch_size_and_sequence(tiny):
    axes = graph_specs(tiny.components)["unet"].dynamic_axes()
    assert axes["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert axes["timestep"] == {0: "batch"}
    assert axes["encoder_hidden_states"] == {0: "batch", 1: "sequence"}
    assert graph_specs(tiny.components)["text_encoder"].dynamic_axes()["input_ids"] == {0: "batch", 1: "sequence"}


def test_default_ranges_come_from_the_model(tiny):
    ranges = ShapeRanges().resolved(tiny.components)
    assert ranges.batch == (1, 1, 4)
    assert ranges.height == ranges.width == (16, 64, 128)  # min size, default size, twice the default
    assert ranges.sequence == (1, 77, 77)


def test_unet_profile_doubles_the_batch_and_rounds_sizes_to_its_multiple(tiny):
    specs = graph_specs(tiny.components)
    ranges = ShapeRanges(batch=(1, 2, 4), height=(20, 70, 130), width=(16, 64, 64), sequence=(77, 77, 77))
    unet = graph_profile(specs["unet"], ranges.resolved(tiny.components))
    assert unet == {"batch": (1, 4, 8), "height": (32, 64, 128), "width": (16, 64, 64), "sequence": (77, 77, 77)}
    vae = graph_profile(specs["vae_decoder"], ranges.resolved(tiny.components))
    assert vae == {"batch": (1, 2, 4), "height": (24, 72, 128), "width": (16, 64, 64)}
    text = graph_profile(specs["text_encoder"], ranges.resolved(tiny.components))
    assert text == {"batch": (1, 2, 4), "sequence": (77, 77, 77)}


def test_controlnet_graphs_get_the_denoisers_doubled_batch_and_residual_shapes(tiny):
    import dataclasses

    from diffrt.models.control import random_controlnet

    parts = dataclasses.replace(tiny.components, controlnets=[random_controlnet(tiny.components.unet)])
    specs = graph_specs(parts)
    ranges = ShapeRanges(batch=(1, 2, 4)).resolved(parts)
    assert graph_profile(specs["controlnet_0"], ranges)["batch"] == (1, 4, 8)
    residuals = [t.name for t in specs["unet"].inputs if t.name.endswith("_res") or "_res_" in t.name]
    assert residuals == specs["controlnet_0"].output_names and residuals[-1] == "mid_res"
    values = {"batch": 2, "height": 64, "width": 32, "sequence": 77}
    down, mid = parts.controlnets[0](torch.zeros(2, 4, 8, 4), 1.0, torch.zeros(2, 77, 32),
                                     torch.zeros(2, 3, 64, 32), return_dict=False)  # fmt: skip
    shapes = specs["controlnet_0"].output_shapes(values)
    assert [tuple(t.shape) for t in (*down, mid)] == list(shapes.values())


def test_profile_shapes_per_input(tiny):
    specs = graph_specs(tiny.components)
    ranges = ShapeRanges(batch=(1, 1, 2), height=(16, 64, 128), width=(32, 64, 96)).resolved(tiny.components)
    shapes = input_profile_shapes(specs["unet"], graph_profile(specs["unet"], ranges))
    assert shapes["sample"] == ((1, 4, 2, 4), (2, 4, 8, 8), (4, 4, 16, 12))
    assert shapes["timestep"] == ((1,), (2,), (4,))
    assert shapes["encoder_hidden_states"] == ((1, 1, 32), (2, 77, 32), (4, 77, 32))
    decoder = input_profile_shapes(specs["vae_decoder"], graph_profile(specs["vae_decoder"], ranges))
    assert decoder["latent"] == ((1, 4, 2, 4), (1, 4, 8, 8), (2, 4, 16, 12))


@pytest.mark.parametrize(
    "ranges, message",
    [
        (ShapeRanges(batch=(2, 1, 4)), "1 <= min <= opt <= max"),
        (ShapeRanges(batch=(0, 1, 4)), "1 <= min <= opt <= max"),
        (ShapeRanges(height=(17, 20, 30)), "holds no multiple of 16"),
        (ShapeRanges(sequence=(1, 77, 100)), None),  # clipped to the text encoder's 77 positions
    ],
)
def test_bad_ranges_are_clear_errors(tiny, ranges, message):
    specs = graph_specs(tiny.components)
    if message is None:
        profile = graph_profile(specs["text_encoder"], ranges.resolved(tiny.components))
        assert profile["sequence"] == (1, 77, 77)
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        for spec in specs.values():
            graph_profile(spec, ranges.resolved(tiny.components))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x.pop("timestep"), r"missing \['timestep'\]"),
        (lambda x: x.update(extra=torch.zeros(1)), r"unknown \['extra'\]"),
        (lambda x: x.update(sample=torch.zeros(2, 3, 2, 2)), "axis 1 must be 4"),
        (lambda x: x.update(timestep=torch.zeros(3)), "disagree on batch"),
        (lambda x: x.update(sample=torch.zeros(2, 4, 3, 2)), "height 24 is not a multiple of 16"),
        (lambda x: x.update(encoder_hidden_states=torch.zeros(2, 77)), "must have shape"),
    ],
)
def test_bad_inputs_are_clear_errors(tiny, change, message):
    spec = graph_specs(tiny.components)["unet"]
    inputs = spec.sample_inputs({"batch": 2, "height": 32, "width": 32, "sequence": 77})
    change(inputs)
    with pytest.raises(ValueError, match=message):
        spec.check_inputs(inputs)


def test_inputs_outside_a_profile_or_the_graphs_limits_are_refused(tiny):
    specs = graph_specs(tiny.components)
    unet = specs["unet"]
    inputs = unet.sample_inputs({"batch": 2, "height": 160, "width": 32, "sequence": 77})
    assert unet.check_inputs(inputs)["height"] == 160
    profile = {"batch": (1, 2, 8), "height": (16, 64, 128), "width": (16, 64, 128), "sequence": (1, 77, 77)}
    with pytest.raises(ValueError, match=r"height 160 is outside the engine's optimization profile \[16, 128\]"):
        unet.check_inputs(inputs, profile)
    ids = specs["text_encoder"].sample_inputs({"batch": 1, "sequence": 78})
    with pytest.raises(ValueError, match=r"sequence 78 is outside what the graph supports \[1, 77\]"):
        specs["text_encoder"].check_inputs(ids)
