"""LoRAs: diffusers/PEFT and kohya files give diffusers' own images, switch in place, unload bit for bit, and bad
files fail before any weight changes."""

import copy
import logging
import tempfile

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffrt
from diffrt.models import lora

peft = pytest.importorskip("peft")

KW = dict(steps=4, guidance=5.0, height=64, width=64, output_type="np")
PROMPT = "a red sneaker"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


def _factors(module, targets, rank, seed):
    """Random LoRA factors for ``module`` named as PEFT names them (the module itself is left untouched)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    clone = copy.deepcopy(module)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), clone)
    generator = torch.Generator().manual_seed(seed)
    layers = get_peft_model_state_dict(clone)
    return {k: torch.randn(v.shape, generator=generator) * (0.1 if "lora_B" in k else 1.0) for k, v in layers.items()}


def lora_factors(pipe, seed, text=True):
    """{part: (factors, rank)} for the U-Net and, with ``text``, every text encoder of ``pipe``'s model."""
    parts = {"unet": (_factors(pipe.components.unet, UNET_TARGETS, 4, seed), 4)}
    if text:
        for k, encoder in enumerate(pipe.components.text_encoders):
            name = "text_encoder" if k == 0 else f"text_encoder_{k + 1}"
            parts[name] = (_factors(encoder, TEXT_TARGETS, 2, seed + k), 2)
    return parts


def save_peft(parts, folder, alpha=None, pipeline_class=diffusers.StableDiffusionPipeline):
    """diffusers' own format (``save_lora_weights``, each part's LoraConfig in the header)."""
    from peft import LoraConfig

    options = {}
    for part, (layers, rank) in parts.items():
        options[f"{part}_lora_layers"] = layers
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=UNET_TARGETS + TEXT_TARGETS)
        options[f"{part}_lora_adapter_metadata"] = config.to_dict()
    pipeline_class.save_lora_weights(folder, **options)
    return folder


KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def save_kohya(parts, path, alpha, prefixes=KOHYA_PREFIXES):
    """kohya/A1111: ``lora_unet_<path>`` / ``lora_te_<path>`` keys, lora_down/lora_up and an alpha per layer."""
    tensors = {}
    for part, (layers, _) in parts.items():
        for key, value in layers.items():
            name, kind = key.rsplit(".lora_", 1)
            stem = f"{prefixes[part]}_{name.replace('.', '_')}"
            tensors[f"{stem}.lora_down.weight" if kind.startswith("A") else f"{stem}.lora_up.weight"] = value
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def _diffusers_images(pipeline_class, folder, adapters, scheduler_of, seeds=(4,)):
    theirs = pipeline_class.from_pretrained(folder, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    for name, (path, _) in adapters.items():
        theirs.load_lora_weights(str(path), adapter_name=name)
    theirs.set_adapters(list(adapters), [scale for _, scale in adapters.values()])
    latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    images = theirs([PROMPT] * len(seeds), latents=latents, num_inference_steps=KW["steps"], height=64, width=64,
                    guidance_scale=KW["guidance"], output_type="np").images  # fmt: skip
    return images, theirs.scheduler


@pytest.fixture(scope="module")
def tiny_loras(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    kohya = lora_factors(tiny, 3)
    return {"peft_a": save_peft(lora_factors(tiny, 1), root / "a"),
            "peft_b": save_peft(lora_factors(tiny, 2), root / "b"),
            "kohya": save_kohya(kohya, root / "k.safetensors", alpha=3),
            "kohya_as_peft": save_peft(kohya, root / "k-peft", alpha=3)}  # fmt: skip


def test_two_adapters_in_both_formats_match_diffusers(tiny_folder, tiny_loras):
    # diffusers 0.42 drops kohya text-encoder keys (its converter's names match no layer of transformers 5's
    # CLIP): its reference loads the same factors from a diffusers-format file with the same alphas
    reference_files = {"a": (tiny_loras["peft_a"], 0.7), "k": (tiny_loras["kohya_as_peft"], -0.5)}
    reference, scheduler = _diffusers_images(diffusers.StableDiffusionPipeline, tiny_folder, reference_files, None)
    ours = diffrt.load(tiny_folder, device="cpu", dtype=torch.float32)
    base = ours(PROMPT, seed=4, scheduler=scheduler, **KW)
    for name, (path, scale) in {"a": (tiny_loras["peft_a"], 0.7), "k": (tiny_loras["kohya"], -0.5)}.items():
        assert ours.load_lora(path, name=name, scale=scale) == name
    assert ours.loras["a"]["parts"] == ["text_encoder", "unet"] and ours.loras["k"]["ranks"] == [2, 4]
    assert ours.loras["a"]["targets"] == sorted(UNET_TARGETS + TEXT_TARGETS) and ours.loras["a"]["scale"] == 0.7
    images = ours(PROMPT, seed=4, scheduler=scheduler, **KW)
    assert np.abs(images - reference).max() <= 1e-4
    assert np.abs(images - base).max() > 0.05  # the adapters do change the images


def test_sdxl_kohya_and_peft_match_diffusers(tiny_sdxl_folder, tmp_path):
    ours = diffrt.load(tiny_sdxl_folder, device="cpu", dtype=torch.float32)
    parts = lora_factors(ours, 5)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    kohya = save_kohya(parts, tmp_path / "k.safetensors", alpha=3, prefixes=prefixes)
    peft_file = save_peft(parts, tmp_path / "p", alpha=3, pipeline_class=diffusers.StableDiffusionXLPipeline)
    reference, scheduler = _diffusers_images(diffusers.StableDiffusionXLPipeline, tiny_sdxl_folder,
                                             {"p": (peft_file, 0.8)}, None)  # fmt: skip
    ours.load_lora(kohya, name="k", scale=0.8)
    assert ours.loras["k"]["parts"] == ["text_encoder", "text_encoder_2", "unet"]
    images = ours(PROMPT, seed=4, scheduler=scheduler, **KW)
    assert np.abs(images - reference).max() <= 1e-4
    ours.unload_lora("k")
    ours.load_lora(peft_file, name="p", scale=0.8)
    assert np.abs(ours(PROMPT, seed=4, scheduler=scheduler, **KW) - reference).max() <= 1e-4


def test_fashion_lora_matches_diffusers(tmp_path):
    from diffrt.models import embedded

    folder = embedded.materialize("fashion", tmp_path / "fashion")
    ours = diffrt.load("fashion", device="cpu", dtype=torch.float32)
    path = save_peft(lora_factors(ours, 7, text=False), tmp_path / "lora", alpha=6)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(path), adapter_name="x")
    theirs.set_adapters(["x"], [0.6])
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    reference = theirs("a dress", latents=latents, num_inference_steps=4, height=32, width=32, guidance_scale=4.0,
                       output_type="np").images  # fmt: skip
    ours.load_lora(path, scale=0.6)
    images = ours("a dress", seed=2, steps=4, guidance=4.0, scheduler=theirs.scheduler, output_type="np")
    assert np.abs(images - reference).max() <= 1e-4


@pytest.mark.parametrize("in_a_file", [False, True])
def test_switching_equals_a_fresh_load_and_unloading_restores_bit_for_bit(tiny, tiny_loras, in_a_file, monkeypatch,
                                                                         caplog, tmp_path):  # fmt: skip
    """``in_a_file``: the weights as loaded kept in a mapped file, as when a copy would not fit in memory (SDXL in
    float32 on 24 GB); restoring from it is as exact."""
    caplog.set_level(logging.INFO, logger="diffrt.models.lora")
    monkeypatch.setattr(lora, "fits_in_memory", lambda size, device: not in_a_file)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = diffrt.load("tiny", device="cpu")
    base = ours(PROMPT, seed=1, **KW)
    weights = {k: v.clone() for k, v in ours.components.unet.state_dict().items()}
    ours.load_lora(tiny_loras["peft_a"], name="a", scale=1.0)
    ours.load_lora(tiny_loras["peft_b"], name="b", scale=0.0)
    ours.set_loras({"a": 0.0, "b": 0.9})
    fresh = diffrt.load("tiny", device="cpu", loras={tiny_loras["peft_b"]: 0.9})
    assert np.array_equal(ours(PROMPT, seed=1, **KW), fresh(PROMPT, seed=1, **KW))
    ours.unload_lora("a")
    ours.unload_lora("b")
    assert ours.loras == {}
    assert all(torch.equal(v, weights[k]) for k, v in ours.components.unet.state_dict().items())
    assert np.array_equal(ours(PROMPT, seed=1, **KW), base)
    assert ("kept in a mapped file" in caplog.text) == in_a_file and list(tmp_path.iterdir()) == []


def test_onnxruntime_switches_without_reexport_and_matches_torch(tiny_loras, tmp_path):
    cache = tmp_path / "cache"
    ours = diffrt.load("tiny", device="cpu", backend="onnxruntime", cache_dir=cache)
    torch_pipe = diffrt.load("tiny", device="cpu")
    base = ours(PROMPT, seed=2, **KW)
    files = sorted(p.name for p in cache.rglob("*.onnx"))
    ours.load_lora(tiny_loras["peft_a"], name="a", scale=0.7)
    ours.load_lora(tiny_loras["kohya"], name="k", scale=0.4)
    torch_pipe.load_lora(tiny_loras["peft_a"], name="a", scale=0.7)
    torch_pipe.load_lora(tiny_loras["kohya"], name="k", scale=0.4)
    assert np.abs(ours(PROMPT, seed=2, **KW) - torch_pipe(PROMPT, seed=2, **KW)).max() <= 1 / 255
    session = ours.backend.runner("unet").session
    ours.set_loras({"a": -0.3})  # the same layers: their buffers are rewritten, the session stays
    torch_pipe.set_loras({"a": -0.3})
    assert ours.backend.runner("unet").session is session
    assert np.abs(ours(PROMPT, seed=2, **KW) - torch_pipe(PROMPT, seed=2, **KW)).max() <= 1 / 255
    ours.unload_lora("a")
    ours.unload_lora("k")
    assert np.array_equal(ours(PROMPT, seed=2, **KW), base)
    assert sorted(p.name for p in cache.rglob("*.onnx")) == files  # nothing re-exported


# ----------------------------------------------------------------------------------------------- bad input
def _weights(pipe):
    return [p.detach().clone() for p in pipe.components.unet.parameters()]


def _unchanged(pipe, before):
    return all(torch.equal(a, b) for a, b in zip(_weights(pipe), before, strict=True))


def test_bad_files_fail_clearly_and_change_nothing(tiny, tiny_loras, tmp_path, caplog):
    pipe = diffrt.load("tiny", device="cpu")
    before = _weights(pipe)
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle file .* never unpickles"):
        pipe.load_lora(pickle)
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pipe.load_lora(garbage)
    nothing = {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}  # fmt: skip
    save_file(nothing, str(tmp_path / "n.safetensors"))
    with pytest.raises(ValueError, match="no key adapts a layer"):
        pipe.load_lora(tmp_path / "n.safetensors")

    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    good = {f"{key}.lora_A.weight": torch.ones(2, 16), f"{key}.lora_B.weight": torch.ones(16, 2)}
    save_file({**good, f"{key}.lora_B.weight": torch.ones(16, 3)}, str(tmp_path / "rank.safetensors"))
    with pytest.raises(ValueError, match="down has rank 2 but up has rank 3"):
        pipe.load_lora(tmp_path / "rank.safetensors")
    save_file({f"{key}.lora_A.weight": torch.ones(2, 24), f"{key}.lora_B.weight": torch.ones(16, 2)},
              str(tmp_path / "arch.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"to_q has weight \(16, 16\).*another architecture"):
        pipe.load_lora(tmp_path / "arch.safetensors")
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{stem}.lora_down.weight": torch.ones(2, 16), f"{stem}.lora_up.weight": torch.ones(16, 2),
               f"{stem}.alpha": torch.ones(2)}, str(tmp_path / "alpha.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="alpha has shape \\(2,\\); an alpha is one number"):
        pipe.load_lora(tmp_path / "alpha.safetensors")
    assert _unchanged(pipe, before) and pipe.loras == {}

    stray = {"unet.no_such_block.to_q.lora_A.weight": torch.ones(2, 16),
             "unet.no_such_block.to_q.lora_B.weight": torch.ones(16, 2)}  # fmt: skip
    save_file({**good, **stray}, str(tmp_path / "some.safetensors"))
    with caplog.at_level(logging.WARNING, logger="diffrt.models.lora"):
        pipe.load_lora(tmp_path / "some.safetensors", name="some")
    assert "2 keys adapt no layer" in caplog.text and "no_such_block" in caplog.text
    changed = _weights(pipe)
    with pytest.raises(ValueError, match="named 'some' is already loaded"):
        pipe.load_lora(tiny_loras["peft_a"], name="some")
    with pytest.raises(ValueError, match="no LoRA named 'other'"):
        pipe.set_loras({"other": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        pipe.set_loras({"some": float("nan")})
    assert _unchanged(pipe, changed)


def test_deployed_exports_refuse_loras_clearly(tiny_loras):
    from diffrt.models.components import Components

    parts = Components("x", "sd", None, None, [], [], None, deployed={"kind": "onnx"})
    with pytest.raises(ValueError, match="deployed export holds no torch weights"):
        lora.Adapters(parts, write=None)


def test_cli_generate_with_lora(tiny_loras, tmp_path, capsys):
    from diffrt.cli import main

    out = tmp_path / "x.png"
    plain = tmp_path / "plain.png"
    assert main(["generate", PROMPT, "--model", "tiny", "--steps", "2", "--device", "cpu", "-o", str(plain)]) == 0
    assert main(["generate", PROMPT, "--model", "tiny", "--steps", "2", "--device", "cpu", "-o", str(out),
                 "--lora", f"{tiny_loras['peft_a']}:0.8", "--lora", str(tiny_loras["kohya"])]) == 0  # fmt: skip
    assert out.read_bytes() != plain.read_bytes()
    assert main(["generate", PROMPT, "--model", "tiny", "--device", "cpu", "-o", str(out), "--lora",
                 str(tmp_path / "nope.safetensors")]) == 2  # fmt: skip
    assert "no LoRA file" in capsys.readouterr().err


def test_lora_spec_parsing(tmp_path):
    assert lora.parse_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert lora.parse_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    odd = tmp_path / "x:1"
    odd.write_bytes(b"")
    assert lora.parse_spec(str(odd)) == (str(odd), 1.0)  # a file whose name has a colon is a path


def test_a_captured_loop_replays_switched_weights_without_recapture(tiny_loras):
    """The capture path on the CPU (diffrt.backends.graphs.ReplayEmulation): a switch writes into the parameters' own
    storage (the pointers a CUDA graph holds stay valid) and leaves the graph key alone, so the loop captured
    before the switch replays it and equals a freshly loaded pipeline with that adapter."""
    from diffrt.backends.graphs import LoopGraphCache, ReplayEmulation

    kw = dict(steps=3, guidance=5.0, height=32, width=32, output_type="latent", progress=False)
    pipe = diffrt.load("tiny", device="cpu", loras={tiny_loras["peft_a"]: 1.0})
    pipe.load_lora(tiny_loras["peft_b"], name="b", scale=0.0)
    pipe.backend.loop_capture = cache = LoopGraphCache(max_graphs=8, capture=ReplayEmulation)
    pointers = {name: p.data_ptr() for name, p in pipe.components.unet.named_parameters()}
    pipe(PROMPT, seed=5, **kw)
    pipe.set_loras({"a": 0.0, "b": 0.7})
    switched = pipe(PROMPT, seed=5, **kw)
    assert cache.captures == 1 and len(cache) == 1
    assert {name: p.data_ptr() for name, p in pipe.components.unet.named_parameters()} == pointers
    fresh = diffrt.load("tiny", device="cpu", loras={tiny_loras["peft_b"]: 0.7})
    torch.testing.assert_close(switched, fresh(PROMPT, seed=5, **kw), rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_triton_captured_loop_sees_switched_weights_without_recapture(tiny_loras):
    pipe = diffrt.load("tiny", device="cuda", dtype=torch.float16, backend="triton")
    pipe.load_lora(tiny_loras["peft_a"], name="a")
    pipe(PROMPT, seed=0, **KW)
    graphs = len(pipe.backend.loop_capture)
    pipe.set_loras({"a": 0.3})
    switched = pipe(PROMPT, seed=0, **KW)
    assert len(pipe.backend.loop_capture) == graphs
    fresh = diffrt.load("tiny", device="cuda", dtype=torch.float16, backend="triton",
                        loras={tiny_loras["peft_a"]: 0.3})  # fmt: skip
    assert np.abs(switched - fresh(PROMPT, seed=0, **KW)).max() <= 2e-3


def test_dora_files_are_refused(tmp_path):
    pipe = diffrt.load("tiny", device="cpu")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 16), f"{key}.lora_B.weight": torch.ones(16, 2),
               f"{key}.lora_magnitude_vector.dora_scale": torch.ones(16)}, str(tmp_path / "d.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="DoRA adapter .* merges plain LoRAs only"):
        pipe.load_lora(tmp_path / "d.safetensors")


def test_a_failed_write_puts_back_the_parts_already_written(tiny_loras):
    """Fault injection: the backend's write fails on the U-Net after the text encoder took its new weights."""
    pipe = diffrt.load("tiny", device="cpu")
    parts = pipe.components
    before = [p.detach().clone() for p in (*parts.text_encoders[0].parameters(), *parts.unet.parameters())]

    def write(part, weights):
        if part == "unet":
            raise RuntimeError("device lost")
        lora.write_into_modules(parts, part, weights)

    adapters = lora.Adapters(parts, write)
    with pytest.raises(RuntimeError, match="device lost"):
        adapters.load(tiny_loras["peft_a"])
    after = [*parts.text_encoders[0].parameters(), *parts.unet.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)) and adapters.loaded == {}


@pytest.mark.parametrize("preset, pipeline_class", [("tiny-flux", "FluxPipeline"),
                                                     ("tiny-sd3", "StableDiffusion3Pipeline")])  # fmt: skip
def test_transformer_family_lora_matches_peft_unmerged_layers(preset, pipeline_class, tmp_path):
    """The transformer families: a diffusers-format file (``transformer.`` keys) merged by diffrt gives the images
    of the same factors run by PEFT's own unmerged LoRA layers."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    ours, reference = diffrt.load(preset, device="cpu"), diffrt.load(preset, device="cpu")
    targets = ["to_q", "to_k", "to_v"]
    layers = _factors(ours.components.transformer, targets, 4, 11)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets)
    save = getattr(diffusers, pipeline_class).save_lora_weights
    save(tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict())
    inject_adapter_in_model(config, reference.components.transformer)
    set_peft_model_state_dict(reference.components.transformer, layers)
    kw = dict(steps=2, guidance=3.0, height=64, width=64, output_type="np")
    base = ours(PROMPT, seed=0, **kw)
    ours.load_lora(tmp_path, scale=1.0)
    images = ours(PROMPT, seed=0, **kw)
    assert ours.loras[tmp_path.name]["parts"] == ["transformer"]
    assert np.abs(images - reference(PROMPT, seed=0, **kw)).max() <= 1e-4 and np.abs(images - base).max() > 1e-3


def test_onnxruntime_runs_the_shipped_lora_on_fashion_as_torch_does(tmp_path):
    kw = dict(steps=8, seed=0, num_images=2, output_type="np")
    ours = diffrt.load("fashion", device="cpu", backend="onnxruntime", cache_dir=tmp_path, loras={"fashion-lora": 0.8})
    reference = diffrt.load("fashion", device="cpu", loras={"fashion-lora": 0.8})
    assert np.abs(ours("a piece of clothing", **kw) - reference("a piece of clothing", **kw)).max() <= 1 / 255
    ours.set_loras({"fashion-lora": 0.3})
    reference.set_loras({"fashion-lora": 0.3})
    assert np.abs(ours("a piece of clothing", **kw) - reference("a piece of clothing", **kw)).max() <= 1 / 255


def test_triton_backend_merges_into_its_patched_modules(tiny_loras):
    """The kernel patcher swaps in modules that share the Linear/Conv weights: a switch reaches them (interpreter
    on the CPU)."""
    kw = dict(steps=1, guidance=1.0, height=64, width=64, output_type="np")  # the interpreter is slow: one pass
    ours = diffrt.load("tiny", device="cpu", backend="triton", loras={tiny_loras["peft_a"]: 0.6})
    reference = diffrt.load("tiny", device="cpu", loras={tiny_loras["peft_a"]: -0.2})
    ours.set_loras({"a": -0.2})
    assert np.abs(ours(PROMPT, seed=3, **kw) - reference(PROMPT, seed=3, **kw)).max() <= 1e-4


@pytest.mark.tensorrt
def test_tensorrt_refits_the_touched_weights(tiny_loras, tmp_path):
    kw = dict(steps=2, guidance=5.0, height=64, width=64, output_type="np")
    ours = diffrt.load("tiny", device="cuda", dtype=torch.float16, backend="tensorrt", refit=True,
                       cache_dir=tmp_path)  # fmt: skip
    reference = diffrt.load("tiny", device="cuda", dtype=torch.float16)
    for pipe in (ours, reference):
        pipe.load_lora(tiny_loras["peft_a"], name="a", scale=0.7)
    assert np.abs(ours(PROMPT, seed=1, **kw) - reference(PROMPT, seed=1, **kw)).max() <= 2e-2
    for pipe in (ours, reference):
        pipe.set_loras({"a": -0.4})
    assert np.abs(ours(PROMPT, seed=1, **kw) - reference(PROMPT, seed=1, **kw)).max() <= 2e-2
