"""``diffrt batch`` on a real local Ray cluster (Ray Data actors): every row once, resumable, a killed worker
losing and duplicating nothing, refused rows reported."""

import hashlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from diffrt.serve import batch

MODEL = "fashion-lcm"
PROMPTS = ["a coat", "a bag", "an ankle boot", "a dress", "a sneaker", "a shirt", "a sandal", "a pullover"]


def settings(**given):
    return batch.BatchSettings(model=MODEL, **{"workers": 2, "batch_size": 2, "worker_cpus": 0.5, **given})


def write_prompts(path: Path, prompts) -> Path:
    path.write_text("\n".join(prompts) + "\n")
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / batch.MANIFEST).read_text().splitlines()]


def assert_each_row_once(out: Path, rows: int) -> list[dict]:
    entries = manifest(out)
    assert sorted(e["row"] for e in entries) == list(range(rows))
    for e in entries:
        assert hashlib.sha256((out / e["file"]).read_bytes()).hexdigest() == e["sha256"]
    return entries


# ------------------------------------------------------------------------------------------ rows (no Ray)
def test_rows_of_a_text_file_get_consecutive_seeds_and_stable_ids(tmp_path):
    path = write_prompts(tmp_path / "p.txt", ["a coat", "", "  a bag  "])
    rows = batch.read_rows(path, MODEL, seed=10)
    assert [(r["row"], r["prompt"], r["seed"]) for r in rows] == [(0, "a coat", 10), (1, "a bag", 11)]
    assert rows == batch.read_rows(path, MODEL, seed=10)
    assert rows[0]["id"] != batch.read_rows(path, "fashion", seed=10)[0]["id"]  # another model redoes the rows
    assert rows[0]["file"] == f"000000_{rows[0]['id'][:10]}.png"


def test_rows_of_a_jsonl_file_carry_their_settings(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a coat", "seed": 7, "steps": 2}\n{"prompt": "a bag", "guidance": 2.5}\n')
    rows = batch.read_rows(path, MODEL)
    assert rows[0]["seed"] == 7 and batch.call_options(rows[0]) == {"steps": 2}
    assert rows[1]["seed"] == 1 and batch.call_options(rows[1]) == {"guidance": 2.5}


@pytest.mark.parametrize(("name", "text", "words"), [
    ("p.csv", "a coat", "a prompts file is .txt"),
    ("p.txt", "\n\n", "holds no prompt"),
    ("p.jsonl", "{prompt: 1}", "p.jsonl:1: not JSON"),
    ("p.jsonl", "[1]", "p.jsonl:1: a line must be a JSON object"),
    ("p.jsonl", '{"prompt": "x", "colour": 1}', "unknown field 'colour'; allowed: prompt, seed, steps"),
    ("p.jsonl", '{"seed": 1}', "a row needs a prompt"),
    ("p.jsonl", '{"prompt": "x"}\n{"prompt": "y", "steps": "4"}', "p.jsonl:2: steps must be an integer, got '4'"),
    ("p.jsonl", '{"prompt": 3}', "prompt must be a string"),
])
def test_bad_prompts_files_are_refused_naming_the_line(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        batch.read_rows(path, MODEL)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        batch.read_rows(tmp_path / "missing.txt", MODEL)


def test_bad_settings_are_refused():
    for given, words in (({"workers": 0}, "workers must be an integer >= 1"),
                         ({"batch_size": 1.5}, "batch_size must be"), ({"worker_cpus": 0}, "worker_cpus must be > 0")):
        with pytest.raises(ValueError, match=words):
            settings(**given).check()


# ------------------------------------------------------------------------------------------- runs on Ray
def test_every_row_is_made_once_with_the_library_images(ray_cluster, tmp_path):
    from PIL import Image

    import diffrt

    out = tmp_path / "out"
    summary = batch.run(write_prompts(tmp_path / "p.txt", PROMPTS[:6]), out, settings(), seed=3)
    assert {k: summary[k] for k in ("rows", "skipped", "made", "failed")} == {"rows": 6, "skipped": 0, "made": 6,
                                                                             "failed": []}  # fmt: skip
    assert summary["wall_s"] >= summary["first_s"] > 0 and summary["images_per_s"] == 6 / summary["wall_s"]
    entries = assert_each_row_once(out, 6)
    pipe = diffrt.load(MODEL)
    for e in entries:
        made = np.asarray(Image.open(io.BytesIO((out / e["file"]).read_bytes()))).astype(int)
        reference = np.asarray(pipe(e["prompt"], seed=e["seed"])[0]).astype(int)
        assert e["seed"] == 3 + e["row"] and np.abs(made - reference).max() <= 1  # batches of 2: float rounding
        assert e["settings"] == {"steps": 4, "sampler": "lcm", "guidance": 4.0, "width": 32, "height": 32}


def test_a_rerun_skips_finished_rows_and_redoes_damaged_or_new_ones(ray_cluster, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS[:4])
    out = tmp_path / "out"
    batch.run(prompts, out, settings())
    assert batch.run(prompts, out, settings()) == {"rows": 4, "skipped": 4, "made": 0, "failed": []}  # no Ray start
    (out / manifest(out)[1]["file"]).write_bytes(b"not a png")  # a damaged file is redone
    with (out / batch.MANIFEST).open("a") as f:
        f.write('{"row": 3, "id": "torn')  # a line cut short by a kill is dropped
    write_prompts(prompts, PROMPTS[:6])  # two new rows
    summary = batch.run(prompts, out, settings())
    assert summary["skipped"] == 3 and summary["made"] == 3
    assert_each_row_once(out, 6)  # the torn line and the damaged file's old entry are gone


def _painter_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"MapBatches(Painter)" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_killed_worker_loses_nothing_and_duplicates_nothing(ray_cluster, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS * 2)
    out = tmp_path / "out"
    done = {}
    runner = threading.Thread(target=lambda: done.update(batch.run(prompts, out, settings())), daemon=True)
    runner.start()
    killed, deadline = None, time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        made = len((out / batch.MANIFEST).read_text().splitlines()) if (out / batch.MANIFEST).exists() else 0
        pids = _painter_pids()
        if made >= 2 and pids:  # the workers are loaded and busy: kill one mid-run
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    runner.join(240)
    assert killed is not None, "no worker was running to kill"
    assert not runner.is_alive(), "the run hung after a worker was killed"
    assert done["made"] == 16 and not done["failed"]
    assert_each_row_once(out, 16)


def test_rows_the_pipeline_refuses_are_reported_and_left_out(ray_cluster, tmp_path, capsys):
    from diffrt.cli import main

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a coat"}\n{"prompt": "a bag", "steps": 0}\n{"prompt": "a dress"}\n')
    out = tmp_path / "out"
    code = main(["batch", str(path), "--model", MODEL, "--out", str(out), "--workers", "1", "--worker-cpus", "0.5"])
    printed = capsys.readouterr().out
    assert code == 2 and "2 images made" in printed
    assert "row 1 refused: steps must be an integer >= 1, got 0" in printed
    assert sorted(e["row"] for e in manifest(out)) == [0, 2]


def test_bench_fid_draws_its_samples_through_diffrt_batch(ray_cluster, tmp_path, capsys):
    from diffrt.cli import main
    from diffrt.core.results import read_result

    baseline, samples = tmp_path / "baseline.json", tmp_path / "samples"
    common = ["bench", "fid", "--model", MODEL, "--samples", "20", "--baseline", str(baseline)]
    assert main([*common, "--workers", "2", "--samples-dir", str(samples), "--update-baseline"]) == 0
    assert sorted(e["row"] for e in manifest(samples)) == list(range(20))
    assert read_result(baseline)["settings"]["workers"] == 2
    assert main(common) == 0  # the in-process path passes against it: the same images, but not quantized to 8 bits
    assert "PASS" in capsys.readouterr().out
    assert main([*common, "--workers", "2", "--cache", "deepcache:interval=2"]) == 2
    assert "does not run with --cache" in capsys.readouterr().err


# ------------------------------------------------------------------------- hardening (issue 35)
def test_duplicate_rows_are_distinct_rows_and_odd_manifest_lines_are_ignored(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a coat", "seed": 1}\n{"prompt": "a coat", "seed": 1}\n{"prompt": "a bag"}\n')
    rows = batch.read_rows(path, MODEL)
    assert len({r["id"] for r in rows}) == 3 and len({r["file"] for r in rows}) == 3
    out = tmp_path / "out"
    out.mkdir()
    good = {"row": 0, "id": rows[0]["id"], "file": "a.png", "sha256": hashlib.sha256(b"png").hexdigest()}
    (out / "a.png").write_bytes(b"png")
    lines = ["[1, 2]", "null", '"text"', json.dumps({**good, "file": "../../etc/passwd"}), json.dumps({"row": 1}),
             '[' * 100_000, json.dumps(good)]  # fmt: skip
    (out / batch.MANIFEST).write_text("\n".join(lines) + "\n")
    assert list(batch.finished(out)) == [rows[0]["id"]]


def test_one_bad_row_fails_alone_and_the_job_goes_on(ray_cluster, tmp_path, capsys):
    """Rows of the same settings share a call: a seed out of range, an unencodable prompt (a lone surrogate, and
    the surrogate escape of a byte that is not UTF-8), a prompt past the character limit and a negative prompt
    that cannot be encoded fail each alone, with their own words; the other rows' images are made."""
    from diffrt.cli import main

    rows = [{"prompt": "a coat"}, {"prompt": "a bag", "seed": -5}, {"prompt": "a \ud800 dress"},
            {"prompt": "a sandal"}, {"prompt": "caf\udce9"}, {"prompt": "x" * 20_001},
            {"prompt": "a shirt", "negative_prompt": "\udfff"}, {"prompt": "a pullover"}]  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "out"
    code = main(["batch", str(path), "--model", MODEL, "--out", str(out), "--workers", "1", "--worker-cpus", "0.5",
                 "--batch-size", "8"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 2 and "3 images made" in printed, printed
    assert sorted(e["row"] for e in manifest(out)) == [0, 3, 7]
    for row, words in ((1, "seeds must be integers in [0, 2**64 - 1]"), (2, "cannot be encoded"),
                       (4, "cannot be encoded"), (5, "characters; at most 20000"), (6, "cannot be encoded")):
        assert f"row {row} refused: " in printed and words in printed.split(f"row {row} refused: ")[1].splitlines()[0]
