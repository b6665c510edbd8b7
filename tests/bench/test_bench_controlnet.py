"""``diffrt bench controlnet`` (edge agreement, adherence), ``bench latency --controlnet`` and ``bench fid
--controlnet``; and the shipped ``fashion-controlnet`` against its stored gate."""

import json
from pathlib import Path

import pytest
import torch

from diffrt.bench.controlnet import edge_scores
from diffrt.cli import main
from diffrt.models import embedded
from diffrt.train import data

REPO = Path(__file__).resolve().parents[2]
needs_data = pytest.mark.skipif(not data.dataset_available(), reason="Fashion-MNIST is not installed")
needs_cv2 = pytest.mark.skipif(not __import__("importlib").util.find_spec("cv2"), reason="OpenCV is not installed")


def test_edge_scores_count_edges_within_the_tolerance():
    reference = torch.zeros(4, 8, 8, dtype=torch.bool)
    reference[:, 2, 1:7] = True  # a horizontal line
    generated = torch.zeros_like(reference)
    generated[0, 2, 1:7] = True  # exact
    generated[1, 3, 1:7] = True  # one pixel off
    generated[2, 5, 1:7] = True  # three pixels off
    generated[3, 2, 1:4] = True  # half the line
    exact = edge_scores(generated, reference, tolerance=1)
    assert exact["f1"].tolist()[:3] == [1.0, 1.0, 0.0]
    assert exact["precision"][3] == 1.0 and exact["recall"][3] == pytest.approx(4 / 6)  # 3 drawn + 1 within a pixel
    strict = edge_scores(generated, reference, tolerance=0)
    assert strict["f1"][1] == 0.0
    nothing = edge_scores(torch.zeros_like(reference), reference)
    assert nothing["f1"].eq(0).all()


@needs_data
@needs_cv2
def test_bench_controlnet_writes_both_arms(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["bench", "controlnet", "--samples", "10", "--steps", "4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    arms = record["metrics"]["arms"]
    assert record["kind"] == "controlnet" and set(arms) == {"without", "with scale 1"}
    for tolerance in ("tol0", "tol1"):  # the shipped ControlNet follows the edges
        assert arms["with scale 1"][f"edge_{tolerance}"]["f1"] > arms["without"][f"edge_{tolerance}"]["f1"]
    assert "edge F1 with scale 1 / without" in capsys.readouterr().out
    assert main(["bench", "controlnet", "--samples", "15", "--out", str(out)]) == 2
    assert main(["bench", "controlnet", "--tolerance", "-1", "--out", str(out)]) == 2
    assert main(["bench", "controlnet", "--scale", "1,x", "--out", str(out)]) == 2


def test_bench_latency_times_each_backend_with_and_without_the_controlnet(tmp_path, capsys):
    out = tmp_path / "lat.json"
    argv = ["bench", "latency", "--model", "tiny", "--steps", "2", "--repeat", "2", "--warmup", "0",
            "--controlnet", "random", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"torch", "torch+controlnet"}
    assert "ControlNet overhead, torch batch 1: U-Net step x" in capsys.readouterr().out


@needs_data
@needs_cv2
@pytest.mark.skipif("fashion-controlnet" not in embedded.ADAPTERS, reason="fashion-controlnet not shipped")
def test_the_controlnet_meets_its_stored_baseline(capsys):
    """``bench fid`` with a ControlNet loaded: fashion-controlnet, each image controlled by a test image's edges."""
    baseline = REPO / "bench" / "baselines" / "fashion-controlnet-dpmpp_2m-20steps-200.json"
    argv = ["bench", "fid", "--model", "fashion", "--controlnet", "fashion-controlnet", "--sampler", "dpmpp_2m",
            "--steps", "20", "--samples", "200", "--baseline", str(baseline)]  # fmt: skip
    assert main(argv) == 0
    assert "PASS" in capsys.readouterr().out
