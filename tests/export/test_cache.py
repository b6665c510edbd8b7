"""The export cache: model hashes, keys, atomic writes, corrupt artifacts rebuilt or refused, two writers."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import diffrt
from diffrt.core import files
from diffrt.export import ArtifactError, ensure_onnx, model_hash, open_export
from diffrt.export import onnx_export as ox
from diffrt.models import artifacts


def test_model_hash_depends_on_weights_and_configs_not_on_paths(tiny, tmp_path):
    from diffrt.models.folders import save_folder as save_components

    a = diffrt.load(save_components(tiny.components, tmp_path / "a"), device="cpu").components
    b = diffrt.load(save_components(tiny.components, tmp_path / "b"), device="cpu").components
    assert model_hash(a) == model_hash(b) == model_hash(tiny.components)  # the preset in memory too
    with torch.no_grad():
        b.unet.conv_in.bias[0] += 1e-3
    assert model_hash(a) != model_hash(b)
    assert model_hash(tiny.components) == model_hash(tiny.components)


def test_cache_keys_change_with_precision_opset_versions_and_model(tiny, monkeypatch):
    c, h = tiny.components, model_hash(tiny.components)
    base = ox.onnx_cache_folder(c, ox.OnnxSettings("fp32", 17).resolved(), h, "/cache")
    assert str(base).startswith("/cache/onnx/tiny-")
    others = [
        ox.onnx_cache_folder(c, ox.OnnxSettings("fp16", 17).resolved(), h, "/cache"),
        ox.onnx_cache_folder(c, ox.OnnxSettings("fp32", 18).resolved(), h, "/cache"),
        ox.onnx_cache_folder(c, ox.OnnxSettings("fp32", 17).resolved(), "0" * 64, "/cache"),
    ]
    real = artifacts.library_versions
    monkeypatch.setattr(artifacts, "library_versions", lambda *n: {**real(*n), "torch": "9.9"})
    others.append(ox.onnx_cache_folder(c, ox.OnnxSettings("fp32", 17).resolved(), h, "/cache"))
    assert len({base, *others}) == 5


def test_cache_dir_comes_from_the_option_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFRT_CACHE", str(tmp_path / "env"))
    assert artifacts.resolve_cache_dir(None) == tmp_path / "env"
    assert artifacts.resolve_cache_dir(tmp_path / "opt") == tmp_path / "opt"
    monkeypatch.delenv("DIFFRT_CACHE")
    assert artifacts.default_cache_dir() == Path.home() / ".cache" / "diffrt"


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    files.atomic_write_bytes(target, b"old")
    files.atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(target, b"half")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    folder, manifest = ensure_onnx(tiny.components, cache_dir=cache, graphs=["text_encoder", "vae_decoder"])
    return cache, folder, manifest


def test_second_use_of_the_cache_exports_nothing(tiny, cached, monkeypatch):
    cache, folder, manifest = cached

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(ox, "_export_graph", no_export)
    again_folder, again = ensure_onnx(tiny.components, cache_dir=cache, graphs=["text_encoder", "vae_decoder"])
    assert again_folder == folder and again == manifest


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "not_onnx"])
def test_a_corrupt_cached_artifact_is_rebuilt_never_loaded(tiny, cached, damage, caplog):
    cache, folder, manifest = cached
    path = folder / "text_encoder.onnx"
    good = path.read_bytes()
    if damage == "flip":
        path.write_bytes(good[:500] + bytes([good[500] ^ 0xFF]) + good[501:])
    elif damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"this is not an ONNX model" * 100)
    with pytest.raises(ArtifactError, match="text_encoder"):
        open_export(folder, tiny.components)  # as a deployment folder: refused
    with caplog.at_level(logging.WARNING, logger="diffrt.export"):
        _, repaired = ensure_onnx(tiny.components, cache_dir=cache, graphs=["text_encoder", "vae_decoder"])
    if damage != "delete":
        assert "rebuilding onnx graph 'text_encoder'" in caplog.text
    assert repaired["graphs"]["text_encoder"]["onnx"]["sha256"] == artifacts.file_sha256(path)
    open_export(folder, tiny.components)
    ox.ort_session(path)


def test_a_file_that_is_not_onnx_is_a_clear_error_even_with_a_matching_hash(tiny, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "unet.onnx").write_bytes(b"\x00garbage" * 64)
    manifest = {"format": artifacts.EXPORT_FORMAT, "kind": "onnx", "precision": "fp32",
                "model": {"hash": model_hash(tiny.components)},
                "graphs": {"unet": {"onnx": artifacts.file_record(folder / "unet.onnx"), "data": None}}}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    open_export(folder, tiny.components)  # the hash matches what the manifest says...
    with pytest.raises(ArtifactError, match="could not be loaded as an ONNX model"):
        ox.ort_session(folder / "unet.onnx")  # ...but it is no model: a clear error, not a crash


def test_a_folder_without_a_manifest_or_of_other_weights_is_refused(tiny, cached, tmp_path):
    _, folder, _ = cached
    with pytest.raises(ArtifactError, match="not a diffrt ONNX export"):
        open_export(tmp_path, tiny.components)
    other = diffrt.load("tiny", device="cpu").components
    with torch.no_grad():
        other.vae.post_quant_conv.bias[0] += 1
    with pytest.raises(ArtifactError, match="exported from other weights"):
        open_export(folder, other)


_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import diffrt
    from diffrt.export import ensure_onnx
    cache, me, other = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    pipe = diffrt.load("tiny", device="cpu")
    me.touch()
    deadline = time.time() + 120
    while not other.exists() and time.time() < deadline:  # start exporting together
        time.sleep(0.01)
    folder, manifest = ensure_onnx(pipe.components, cache_dir=cache, graphs=["text_encoder", "unet"])
    print(folder)
    """
)


def test_two_processes_exporting_into_one_cache_both_succeed_with_one_artifact(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(cache), str(tmp_path / f"ready{k}"), str(tmp_path / f"ready{1 - k}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for k in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert any("waiting for another process" in err for _, err in outs)  # they did overlap
    folders = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "manifest.json", "text_encoder.onnx", "unet.onnx"]
    assert len(list(cache.rglob("*.onnx"))) == 2
    open_export(folder)  # every file matches its recorded hash
