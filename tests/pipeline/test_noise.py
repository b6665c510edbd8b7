"""What a command prints: real warnings once, summaries instead of walls of numbers, progress without a
terminal, and nothing from the libraries that is not the user's business."""

import logging
import subprocess
import sys

from diffrt.pipeline.timing import ProgressLines, StageTimes


def test_stage_times_list_a_few_calls_and_summarise_many():
    few = StageTimes(unet_calls_ms=[1.0, 2.0, 3.0])
    assert "3 model calls: 1.0, 2.0, 3.0" in few.summary()
    many = StageTimes(unet_calls_ms=[float(k) for k in range(1, 1001)]).summary()
    assert "1000 model calls: median 500.5 ms, min 1.0, max 1000.0" in many
    assert len(many) < 400  # not 1000 numbers


def test_a_long_prompt_warns_once_per_call(tiny, caplog):
    prompt = " ".join(["a red sneaker with white laces"] * 40)
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        tiny([prompt] * 3 + ["short"], steps=1, num_images=4, height=32, width=32, output_type="pt")
    warnings = [r for r in caplog.records if "longer than the text encoder" in r.getMessage()]
    assert len(warnings) == 1
    assert "1 of 2 distinct prompts are longer than the text encoder's 77 tokens" in warnings[0].getMessage()


def test_progress_lines_without_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="diffrt"):
        with ProgressLines(3, "denoising", every_s=0.0) as bar:
            for _ in range(3):
                bar.update()
        with ProgressLines(3, "quick") as bar:  # a short run prints nothing
            bar.update(3)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["denoising: 1/3", "denoising: 2/3", "denoising: 3/3"]


def test_a_plain_run_prints_no_library_noise(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffrt.cli", "generate", "a coat", "--steps", "2", "-o",
                           str(tmp_path / "c.png")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no accelerate notice, no "Loading weights" bars
    assert "wrote" in proc.stdout


def test_loading_leaves_the_libraries_progress_bars_as_they_were():
    from transformers.utils import logging as transformers_logging

    import diffrt

    assert transformers_logging.is_progress_bar_enabled()
    diffrt.load("fashion-lcm")
    assert transformers_logging.is_progress_bar_enabled()
