"""ONNX export: files and manifest, parity with torch at several batches and sizes, fp16, bad settings."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch

from diffrt.export import ExportError, export_onnx, external_data, graph_specs, open_export
from diffrt.export import onnx_export as ox
from diffrt.export.modules import graph_module, run_module

BATCHES = (1, 2, 3)
SIZES = ((32, 32), (64, 48))  # two resolutions (height, width), neither the traced one


def _run(session, spec, inputs, precision="fp32"):
    feeds = {t.name: inputs[t.name].to(t.torch_dtype(precision)).numpy() for t in spec.inputs}
    return dict(zip(spec.output_names, session.run(spec.output_names, feeds), strict=True))


def _rel(a, b) -> float:
    return float(np.abs(a.astype(np.float32) - b).max() / np.abs(b).max())


def test_export_writes_one_file_per_graph_and_a_manifest(tiny, fp32_export):
    folder, manifest = fp32_export
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert sorted(manifest["graphs"]) == sorted(graph_specs(tiny.components))
    assert manifest["precision"] == "fp32" and manifest["opset"] == 17 and manifest["exporter"] == "torchscript"
    assert len(manifest["model"]["hash"]) == 64
    assert {"torch", "onnx", "onnxruntime", "diffusers", "transformers", "diffrt"} <= set(manifest["versions"])
    for name, record in manifest["graphs"].items():
        path = folder / record["onnx"]["file"]
        assert path.name == f"{name}.onnx" and path.stat().st_size == record["onnx"]["bytes"]
        assert record["parity"]["max_rel_error"] <= 1e-4 and record["parity"]["bound"] == 1e-4
        assert record["profile_shapes"] and record["inputs"] and record["outputs"]
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == graph_specs(tiny.components)[name].input_names
        assert {p.key: p.value for p in model.metadata_props}["diffrt.model_hash"] == manifest["model"]["hash"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]
    open_export(folder, tiny.components)  # verifies hashes


@pytest.mark.parametrize("graph", ["text_encoder", "unet", "vae_encoder", "vae_decoder"])
def test_fp32_graphs_match_torch_at_batches_1_2_3_and_two_resolutions(tiny, fp32_export, graph):
    folder, manifest = fp32_export
    spec = graph_specs(tiny.components)[graph]
    session = ox.ort_session(folder / manifest["graphs"][graph]["onnx"]["file"])
    module = graph_module(tiny.components, graph)
    generator = torch.Generator().manual_seed(123)
    for batch in BATCHES:
        for height, width in SIZES:
            inputs = spec.sample_inputs({"batch": batch, "height": height, "width": width, "sequence": 77},
                                        generator=generator)  # fmt: skip
            expected = run_module(module, spec, inputs)
            got = _run(session, spec, inputs)
            for name in spec.output_names:
                assert got[name].shape == tuple(expected[name].shape)
                assert _rel(got[name], expected[name].numpy()) <= 1e-4, (graph, batch, height, width, name)


def test_text_encoder_runs_shorter_sequences(tiny, fp32_export):
    folder, manifest = fp32_export
    spec = graph_specs(tiny.components)["text_encoder"]
    session = ox.ort_session(folder / manifest["graphs"]["text_encoder"]["onnx"]["file"])
    inputs = spec.sample_inputs({"batch": 2, "sequence": 16}, generator=torch.Generator().manual_seed(5))
    expected = run_module(graph_module(tiny.components, "text_encoder"), spec, inputs)["hidden"].numpy()
    assert _rel(_run(session, spec, inputs)["hidden"], expected) <= 1e-4


def test_sdxl_graphs_export_with_pooled_and_size_conditioning(tiny_sdxl, tmp_path):
    manifest = export_onnx(tiny_sdxl, tmp_path, precision="fp32")
    assert [o[0] for o in manifest["graphs"]["text_encoder_2"]["outputs"]] == ["hidden", "pooled"]
    assert [i[0] for i in manifest["graphs"]["unet"]["inputs"]][-2:] == ["text_embeds", "time_ids"]
    assert all(r["parity"]["max_rel_error"] <= 1e-4 for r in manifest["graphs"].values())


def test_fp16_export_keeps_normalization_and_softmax_in_float32(tiny, fp16_export):
    folder, manifest = fp16_export
    assert manifest["precision"] == "fp16"
    for name, record in manifest["graphs"].items():
        assert record["parity"]["max_rel_error"] <= ox.PARITY_BOUNDS["fp16"], name
        model = onnx.load(str(folder / record["onnx"]["file"]))
        producers = {out: node for node in model.graph.node for out in node.output}
        fragile = [n for n in model.graph.node if n.op_type in ox.FP32_OPS]
        assert fragile, name
        for node in fragile:
            source = producers.get(node.input[0])
            cast_up = (
                source is not None and source.op_type == "Cast" and source.attribute[0].i == onnx.TensorProto.FLOAT
            )
            # torch itself may already compute a softmax in float32 (CLIP's eager attention does)
            assert cast_up or _is_float32(model, node.input[0]), (name, node.name)
    unet = onnx.load(str(folder / "unet.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in unet.graph.input}
    assert types == {"sample": onnx.TensorProto.FLOAT16, "timestep": onnx.TensorProto.FLOAT,
                     "encoder_hidden_states": onnx.TensorProto.FLOAT16}  # fmt: skip


def _is_float32(model, name) -> bool:
    return ox.elem_types(model).get(name) == onnx.TensorProto.FLOAT


def test_keep_fp32_wraps_a_float16_softmax_in_casts():
    from onnx import TensorProto, helper

    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1, name="sm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert ox.keep_fp32(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Cast", "Softmax", "Cast"]
    onnx.checker.check_model(model, full_check=True)
    x = np.array([[1, 2, 3], [0, 0, 9]], np.float16)
    y = ox.ort_session(_save(model)).run(None, {"x": x})[0]
    assert y.dtype == np.float16 and np.allclose(y, torch.softmax(torch.tensor(x).float(), -1).numpy(), atol=1e-3)


def _save(model):
    import tempfile

    path = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False).name
    onnx.save(model, path)
    return path


def test_large_graphs_keep_their_weights_in_one_data_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(external_data, "LIMIT", 0)  # as if the graph were over protobuf's 2 GiB
    manifest = export_onnx(tiny, tmp_path, graphs=["vae_decoder"])
    record = manifest["graphs"]["vae_decoder"]
    assert record["data"]["file"] == "vae_decoder.onnx.data"
    assert (tmp_path / "vae_decoder.onnx").stat().st_size < record["data"]["bytes"]
    assert record["parity"]["max_rel_error"] <= 1e-4
    # what TensorRT's parse_from_file (and ONNX Runtime) need: every location a bare name beside the .onnx file,
    # resolved against the file's folder whatever the working directory
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    graph = onnx.load(str(tmp_path / "vae_decoder.onnx"), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in graph.graph.initializer if uses_external_data(t)}
    assert locations == {"vae_decoder.onnx.data"}
    monkeypatch.chdir("/")
    loaded = onnx.load(str(tmp_path / "vae_decoder.onnx"))
    assert not any(uses_external_data(t) for t in loaded.graph.initializer)
    with open(tmp_path / "vae_decoder.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        open_export(tmp_path, tiny.components)


def test_a_graph_over_its_parity_bound_is_not_written(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(ox.PARITY_BOUNDS, "fp32", 0.0)
    with pytest.raises(ExportError, match=r"text_encoder: the fp32 ONNX graph differs from torch by .* over the bound"):
        export_onnx(tiny, tmp_path, graphs=["text_encoder"])
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".tmp*"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precision="bf16"), "precision must be one of"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(opset=11), r"opset for the torchscript exporter must be an integer in \[14, 20\]"),
        (dict(exporter="tf2onnx"), "exporter must be one of"),
        (dict(graphs=["text_encoder_2"]), r"unknown graph\(s\) \['text_encoder_2'\]"),
    ],
)
def test_bad_settings_are_clear_errors(tiny, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(tiny, tmp_path, **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="the dynamo exporter needs onnxscript")
def test_the_dynamo_exporter_also_works(tiny, tmp_path):
    manifest = export_onnx(tiny, tmp_path, exporter="dynamo", graphs=["text_encoder"])
    assert manifest["exporter"] == "dynamo" and manifest["opset"] == 18
    assert manifest["graphs"]["text_encoder"]["parity"]["max_rel_error"] <= 1e-4


class _Wide(torch.nn.Module):
    """One linear layer of 2.2 GB of float32 weights: past protobuf's 2 GiB, as SD 1.5's U-Net in fp32."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(16384, 34000, bias=True)
        with torch.no_grad():
            self.layer.weight.normal_(0, 16384**-0.5)

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_graph_past_two_gib_is_written_with_its_weights_apart_and_runs(tmp_path, exporter):
    """The size decision reads the initializers' bytes (ModelProto.ByteSize fails past 2 GiB, which is how SD
    1.5's fp32 U-Net failed to export); both exporters' files are rewritten by streaming into one data file,
    which the ONNX checker and ONNX Runtime read back."""
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("the dynamo exporter needs onnxscript")
    from diffrt.export.specs import Dim, GraphSpec, TensorSpec

    module = _Wide().eval()
    batch = Dim("batch")
    spec = GraphSpec("wide", (TensorSpec("x", (batch, 16384)),), (TensorSpec("y", (batch, 34000)),))
    settings = ox.OnnxSettings(exporter=exporter).resolved()
    path = tmp_path / "wide.onnx"
    raw = ox.trace_graph(module, spec, settings, path, {"batch": 2})
    data_name = ox.finish_graph(raw, path, "wide", settings, {})
    assert data_name == "wide.onnx.data"
    assert path.stat().st_size < 1_000_000 and (tmp_path / data_name).stat().st_size >= 16384 * 34000 * 4
    onnx.checker.check_model(str(path))
    x = torch.randn(3, 16384, generator=torch.Generator().manual_seed(0))
    y = ox.ort_session(path).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = module(x).numpy()
    assert np.abs(y - expected).max() <= 1e-4 * np.abs(expected).max()


def test_an_export_that_would_not_fit_takes_the_lean_exporter_or_is_refused(tiny, monkeypatch):
    """TorchScript holds about twice a graph's weights beside the model, dynamo about a tenth: with the memory
    for dynamo only, the default exporter gives way; a named one, or too little for either, is refused first."""
    from diffrt.core import memory

    components = tiny.components
    settings = ox.OnnxSettings().resolved()
    unet = ox.export_memory(components, "unet", settings)
    lean = ox.export_memory(components, "unet", ox.OnnxSettings(exporter="dynamo").resolved())
    assert 0 < lean < unet
    monkeypatch.setattr(memory, "available_bytes", lambda device: ((lean + unet) // 2, "free here"))
    assert ox.fitting_exporter(components, settings, ["unet"], named=False).exporter == "dynamo"
    with pytest.raises(ExportError, match=r"exporting unet of tiny with the torchscript exporter needs about .* GB"):
        ox.fitting_exporter(components, settings, ["unet"], named=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (lean // 2, "free here"))
    with pytest.raises(ExportError, match="free here"):
        export_onnx(tiny, "/nonexistent/never-written", graphs=["unet"])


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="the dynamo exporter needs onnxscript")
def test_sdxl_in_float16_through_the_dynamo_exporter_loads_and_matches(tiny_sdxl, tmp_path):
    """The dynamo exporter writes SDXL's added-condition Concat of float16 text embeddings and float32 time
    embeddings without torch's promotion, which ONNX Runtime refused to load (found exporting the real sdxl
    preset, where the exporter that fits its memory is dynamo): the Concat is mended, the graph matches torch."""
    manifest = export_onnx(tiny_sdxl, tmp_path, precision="fp16", exporter="dynamo", graphs=["unet"])
    assert manifest["graphs"]["unet"]["parity"]["max_rel_error"] <= ox.PARITY_BOUNDS["fp16"]
