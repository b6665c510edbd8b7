"""The compile backend's ahead-of-time packages (aot=True, diffrt.backends.aot): AOTInductor's code for a graph
gives eager's outputs on odd shapes and expanded inputs, reads the module's own weights (in-place writes
seen), is loaded by a fresh process without compiling, and a call outside its sizes or a damaged package makes
a new one. A small conv graph keeps each compile to seconds; the whole fashion-lcm pipeline is the slow test."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffrt
from diffrt.backends.aot import AotGraph
from diffrt.core.graphspec import Dim, GraphSpec, TensorSpec

ROOT = Path(__file__).resolve().parents[2]
SPEC = GraphSpec("toy", (TensorSpec("sample", (Dim("batch"), 3, Dim("height"), Dim("width"))),
                         TensorSpec("timestep", (Dim("batch"),), "float32")),
                 (TensorSpec("out", (Dim("batch"), 8, Dim("height"), Dim("width"))),))  # fmt: skip


class Toy(torch.nn.Module):
    """Conv, GroupNorm, a timestep embedding and a branch on the batch size (as diffusers' upsampler has)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.time = torch.nn.Linear(1, 8)

    def forward(self, sample, timestep):
        h = self.norm(self.conv(sample)) + self.time(timestep[:, None])[:, :, None, None]
        if sample.shape[0] >= 4:  # torch.export ends the batch range at 3 here
            h = h * 2
        return torch.nn.functional.silu(h)


def toy(seed: int) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def inputs(batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(1, generator=g) * 1000
    return {"sample": torch.randn(batch, 3, height, width, generator=g), "timestep": t.expand(batch)}  # stride 0


def check(graph: AotGraph, module: Toy, batch: int, height: int, width: int) -> None:
    x = inputs(batch, height, width)
    with torch.inference_mode():
        torch.testing.assert_close(graph(**x), module(**x), rtol=1e-5, atol=1e-5)


def test_packages_match_eager_and_a_call_outside_their_sizes_compiles_another(tmp_path):
    module = toy(0)
    graph = AotGraph("toy", module, SPEC, tmp_path, torch.float32, "default")
    check(graph, module, 1, 8, 8)  # exported at batch 2: the package also takes 1, 3 and any size
    check(graph, module, 3, 5, 7)
    assert graph.compiled == 1 and graph.packages[0].axes["sample"][0] == [0, 3]
    check(graph, module, 5, 6, 6)  # past the branch: a second package
    assert graph.compiled == 2 and graph.packages[1].axes["sample"][0][0] == 4
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".pt2", ".pt2"]

    with torch.no_grad():  # a LoRA merge writes the weights in place: the package reads the same storage
        module.conv.weight.mul_(1.5)
        module.norm.weight.add_(0.5)  # small tensors too: none is inlined into the code
        module.time.bias.sub_(1.0)
    check(graph, module, 2, 8, 8)
    assert graph.compiled == 2


FRESH_PROCESS = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from tests.pipeline.test_aot_packages import AotGraph, SPEC, inputs, toy
module = toy(1)  # other weights than the process that compiled: the package holds none
graph = AotGraph("toy", module, SPEC, sys.argv[1], torch.float32, "default")
x = inputs(2, 8, 8)
with torch.inference_mode():
    torch.testing.assert_close(graph(**x), module(**x), rtol=1e-5, atol=1e-5)
print(graph.compiled, len(graph.packages))
"""


def test_a_fresh_process_loads_the_packages_without_compiling(tmp_path):
    check(AotGraph("toy", toy(0), SPEC, tmp_path, torch.float32, "default"), toy(0), 2, 8, 8)
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path), str(ROOT)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["0", "1"]  # compiled nothing, used the one package


def test_a_damaged_package_is_compiled_again_with_a_warning(tmp_path, caplog):
    module = toy(0)
    check(AotGraph("toy", module, SPEC, tmp_path, torch.float32, "default"), module, 2, 8, 8)
    package = next(tmp_path.glob("*.pt2"))
    package.write_bytes(package.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        graph = AotGraph("toy", module, SPEC, tmp_path, torch.float32, "default")
        check(graph, module, 2, 8, 8)
    assert "cannot use the compiled package" in caplog.text and graph.compiled == 1

    (tmp_path / f"{graph.prefix}-unreadable.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        assert len(AotGraph("toy", module, SPEC, tmp_path, torch.float32, "default").packages) == 1
    assert "ignoring the compiled package record" in caplog.text


def test_bad_aot_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="aot must be True or False, got 'yes'"):
        diffrt.load("tiny", device="cpu", backend="compile", aot="yes", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="aot=True .* needs persist=True"):
        diffrt.load("tiny", device="cpu", backend="compile", aot=True, persist=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot use mode 'reduce-overhead'"):
        diffrt.load("tiny", device="cpu", backend="compile", aot=True, mode="reduce-overhead", cache_dir=tmp_path)


PIPELINE_PROCESS = """
import sys, time, torch, diffrt
pipe = diffrt.load("fashion-lcm", backend="compile", aot=True, cache_dir=sys.argv[1])
start = time.perf_counter()
image = pipe("a shirt", seed=0)[0]
first = time.perf_counter() - start
image.save(sys.argv[2])
print(sum(g.compiled for g in pipe.backend.compiled.values()), first)
"""


@pytest.mark.slow  # the U-Net's package takes about 2 minutes to compile on 2 cores
def test_fashion_lcm_packages_give_eagers_images_and_a_second_process_starts_without_compiling(tmp_path):
    from PIL import Image

    runs = []
    for name in ("first", "second"):
        proc = subprocess.run([sys.executable, "-c", PIPELINE_PROCESS, str(tmp_path / "cache"),
                               str(tmp_path / f"{name}.png")], capture_output=True, text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        compiled, first_call = proc.stdout.split()[-2:]
        runs.append((int(compiled), float(first_call)))
    assert runs[0][0] == 2 and runs[1][0] == 0  # the U-Net and the VAE decoder, then nothing
    assert runs[1][1] < 5.0  # loads two packages and runs; the first process took minutes
    eager = np.asarray(diffrt.load("fashion-lcm")("a shirt", seed=0)[0], dtype=np.int16)
    for name in ("first", "second"):
        assert np.abs(np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16) - eager).max() <= 2
