"""Bounded memory and work: the estimate against measured peaks, refusals before any work, and a long
batched run whose resident set stays flat."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffrt.core import memory

HERE = Path(__file__).parent


@pytest.mark.parametrize(
    "model, height, width, n",
    [("tiny", 256, 256, 1), ("tiny", 512, 384, 2), ("fashion", 128, 128, 4), ("fashion-flow", 256, 256, 1),
     ("fashion-lcm", 128, 256, 8)],
)  # fmt: skip
def test_estimate_covers_the_measured_peak_without_refusing_what_fits(model, height, width, n):
    # a fresh process: the peak (VmHWM) is reset after loading, then one call at this size is measured
    out = subprocess.run([sys.executable, str(HERE / "measure_peak.py"), model, str(height), str(width), str(n)],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["measured"] <= found["estimated"], found  # never too low: a call that is let through fits
    assert found["estimated"] <= 2 * found["measured"] + memory.OVERHEAD, found  # nor far too high


def _count_runs(pipe):
    calls = []
    run = pipe.backend.run
    pipe.backend.run = lambda graph, **inputs: calls.append(graph) or run(graph, **inputs)
    return calls, run


_MEMORY = r"100000 image\(s\) of 64x64 need about .* GiB .* but only .* GiB is available"


@pytest.mark.parametrize(
    "options, match, batches_match",
    [
        (dict(height=100_000), r"64x100000 is 1562x the area this model was trained at \(64x64\); at most 64x", None),
        (dict(height=1024, width=1024), "256x the area", None),
        # one call refuses the count itself; a batch of that many, its memory
        (dict(num_images=100_000), "100000 images in one call; at most 1024", _MEMORY),
    ],
)
def test_calls_too_large_are_refused_before_any_work(tiny, options, match, batches_match):
    calls, run = _count_runs(tiny)
    try:
        with pytest.raises(ValueError, match=match):
            tiny.generate("x", steps=1, **options)
        with pytest.raises(ValueError, match=batches_match or match):  # a batch that cannot fit, likewise
            next(tiny.generate_batches("x", steps=1, batch_size=100_000, **options))
    finally:
        tiny.backend.run = run
    assert calls == []


def test_batches_give_the_same_images_as_one_call(tiny):
    whole = tiny.generate("x", steps=2, num_images=5, seed=3, output_type="pt", height=32, width=32)
    parts = list(tiny.generate_batches("x", steps=2, num_images=5, seed=3, output_type="pt", height=32, width=32,
                                       batch_size=2))  # fmt: skip
    assert [r.seeds for r in parts] == [[3, 4], [5, 6], [7]]
    import torch

    torch.testing.assert_close(torch.cat([r.images for r in parts]), whole.images, atol=1e-5, rtol=0)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def test_a_large_n_runs_in_flat_memory_writing_images_as_it_goes(tmp_path):
    out = tmp_path / "shots"
    command = [sys.executable, "-m", "diffrt.cli", "generate", "a coat", "--model", "fashion-lcm", "--steps", "1",
               "-n", "100000", "-o", f"{out}/"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    samples = []  # (seconds, resident MiB, images written)
    try:
        start = time.monotonic()
        while time.monotonic() - start < 30 and proc.poll() is None:
            time.sleep(1)
            written = len(os.listdir(out)) if out.is_dir() else 0
            samples.append((time.monotonic() - start, _rss_mib(proc.pid), written))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]  # still running at the end
    running = [s for s in samples if s[2] >= 64]  # past the first batches: steady state
    assert len(running) >= 5, samples
    first, last = running[0], running[-1]
    assert last[2] - first[2] >= 200, samples  # images keep being written as batches finish...
    assert last[1] <= first[1] + 64, samples  # ...in the memory of one batch
    assert max(s[1] for s in running) < 2048, samples
