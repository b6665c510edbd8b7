"""``diffrt serve`` hardening (issue 35) on a real local Ray cluster, over real HTTP: one bad request never
harms the others batched with it, every error is a counted JSON answer, limits are refused up front, a request
past its timeout (or whose client left) stops its work within about a step, and what can be checked before Ray
starts is one line from the command.

Two applications: ``iso`` (fashion-lcm, batches of up to 8 gathered for 0.3 s) and ``slow`` (fashion, one image
at a time, a 1 s timeout, up to 1000 steps allowed, so one request can hold the replica)."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("ray.serve", reason="the serve extra (pip install 'diffrt[serve]') is not installed")

from .test_server import _free_port, call, generate, in_parallel, metric  # noqa: E402


@pytest.fixture(scope="module")
def server(ray_cluster):
    from ray import serve

    from diffrt.serve import app, protocol

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    iso = app.Settings(model="fashion-lcm", replicas=1, replica_cpus=0.5, max_batch=8, batch_wait_s=0.3, name="iso")
    slow = app.Settings(model="fashion", replicas=1, replica_cpus=0.5, max_batch=1, timeout_s=1.0, name="slow",
                        route_prefix="/slow", limits=protocol.Limits(max_steps=1000))  # fmt: skip
    for settings in (iso, slow):
        serve.run(app.build(settings, cpus=2, gpus=0), name=settings.name, route_prefix=settings.route_prefix)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "address": ray_cluster}
    serve.shutdown()


# 1. a bad request in a batch fails alone ----------------------------------------------------------------------
def test_a_bad_request_among_batched_ones_fails_alone(server):
    bodies = [{"prompt": p, "seed": k} for k, p in enumerate(["a coat", "a bag", "a dress", "a shirt"])]
    bad = [{"prompt": "a \ud800 coat"}, {"prompt": "caf\udce9"}, {"prompt": "a coat", "negative_prompt": "\udfff"},
           {"prompt": "a bag", "seed": -5}, {"prompt": "a bag", "guidance": 10**400}]  # fmt: skip
    answers = in_parallel(lambda body: generate(server, body), [*bodies, *bad])
    assert [a[0] for a in answers] == [200] * len(bodies) + [400] * len(bad), [a[:2] for a in answers]
    assert max(a[1]["diffrt"]["batch"]["requests"] for a in answers[: len(bodies)]) > 1  # still batched
    messages = [a[1]["error"]["message"] for a in answers[len(bodies):]]
    assert "cannot be encoded" in messages[0] and "cannot be encoded" in messages[1]
    assert "negative_prompt cannot be encoded" in messages[2] and "seeds must be integers" in messages[3]
    assert "guidance must be a number in [0, 100], got an integer of 401 digits" in messages[4]


def test_a_call_that_fails_is_retried_request_by_request(ray_cluster):
    """A failure the checks cannot see (a fault injected into one prompt's call): the call's other requests are
    answered from their own calls, the culprit gets its own 500."""
    import diffrt
    from diffrt.serve import app, protocol

    generator = object.__new__(app.Generator.func_or_class)
    generator.settings = app.Settings(model="fashion-lcm")
    generator.pipe = diffrt.load("fashion-lcm")
    generator.base_loras, generator.loras, generator.resolved = {}, {}, {"steps": 4}
    real = generator.pipe.generate

    def failing(prompt, *args, **kwargs):
        if any("boom" in p for p in prompt):
            raise RuntimeError("injected fault")
        return real(prompt, *args, **kwargs)

    generator.pipe.generate = failing
    jobs = [protocol.Job(p, 1, k, None, ()) for k, p in enumerate(["a coat", "boom", "a bag"])]
    answers = generator._run_call(jobs, [app.Ticket(time.time() + 60) for _ in jobs])
    assert [a.get("status") for a in answers] == [None, 500, None]
    assert "injected fault" in answers[1]["error"] and answers[0]["images"] and answers[2]["images"]


# 2. every error JSON-shaped and counted ------------------------------------------------------------------------
def test_huge_numbers_and_deep_json_get_counted_json_400s(server):
    before = metric(server, "diffrt_requests_total")
    for body, param, words in (({"prompt": "x", "lora": {"a": 10**400}}, "lora", "an integer of 401 digits"),
                               ({"prompt": "x", "steps": 10**400}, "steps", "steps must be at most"),
                               ({"prompt": "x", "seed": 10**400}, "seed", "seeds must be integers")):  # fmt: skip
        status, answer, _ = generate(server, body)
        assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer
    status, answer, _ = call(f"{server['url']}/v1/images/generations", data=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in answer["error"]["message"]
    assert metric(server, "diffrt_requests_total") >= before + 4


# 3. bounded work ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "words"), [
    ({"prompt": "x", "steps": 200}, "steps must be at most 150 on this server, got 200"),
    ({"prompt": "x", "n": 9}, "n must be at most 8 on this server, got 9"),
    ({"prompt": "x" * 4001}, "prompt has 4001 characters; this server takes at most 4000"),
])  # fmt: skip
def test_limits_are_refused_up_front(server, body, words):
    status, answer, _ = generate(server, body)
    assert status == 400 and words in answer["error"]["message"], answer


def test_a_huge_prompt_is_refused_at_once(server):
    start = time.perf_counter()
    status, answer, _ = generate(server, {"prompt": "x" * 10_000_000})
    assert status == 400 and "characters" in answer["error"]["message"]
    assert time.perf_counter() - start < 10


def _free_after(server, hold) -> tuple[float, float]:
    """(seconds until ``hold`` gave up, seconds from then until a small request is answered)."""
    start = time.perf_counter()
    hold()
    released = time.perf_counter()
    status, answer, _ = generate(server, {"prompt": "a coat", "steps": 2, "seed": 1}, prefix="/slow", timeout=120)
    assert status == 200, answer
    return released - start, time.perf_counter() - released


def test_a_timed_out_request_frees_its_replica_within_about_a_step(server):
    """800 steps of 8 images hold fashion's replica for minutes; the 504 comes after 1 s and the call stops at
    its next step, so the next request is answered in seconds."""
    def hold():
        status, answer, _ = generate(server, {"prompt": "a bag", "steps": 800, "n": 8}, prefix="/slow", timeout=120)
        assert status == 504 and "timeout of 1 s" in answer["error"]["message"]

    waited, then = _free_after(server, hold)
    assert waited < 5 and then < 5, (waited, then)


def test_a_request_whose_client_left_frees_its_replica(server):
    def hold():
        with pytest.raises((TimeoutError, urllib.error.URLError, socket.timeout)):
            generate(server, {"prompt": "a bag", "steps": 800, "n": 8}, prefix="/slow", timeout=0.5)

    waited, then = _free_after(server, hold)
    assert then < 5, then


# 6. what can be checked before Ray starts ----------------------------------------------------------------------
def _serve(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "diffrt.cli", "serve", *argv], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _one_line(proc, words):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and err.splitlines()[-1].startswith("diffrt: error:"), err[-2000:]
    assert words in err.splitlines()[-1], err[-2000:]


@pytest.mark.parametrize(("argv", "words"), [
    (["--lora", "missing.safetensors"], "no LoRA file at missing.safetensors"),
    (["--model", "nonexistent"], "is neither an embedded model"),
    (["--model", "flux-dev:blocks=2"], "blocks= takes 2 count"),
    (["--backend", "jax"], "unknown backend"),
    (["--max-steps", "0"], "max_steps must be an integer >= 1"),
])  # fmt: skip
def test_start_up_mistakes_are_one_line_before_ray_starts(argv, words):
    start = time.perf_counter()
    proc = _serve(*argv)
    _one_line(proc, words)
    assert len(proc.stderr.strip().splitlines()) <= 3 and time.perf_counter() - start < 60  # no cluster started


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        _one_line(_serve("--port", str(taken.getsockname()[1])), "cannot listen on 127.0.0.1:")


def test_a_replica_that_fails_to_start_is_one_line_naming_its_error(tmp_path):
    """A folder that passes the checks before Ray (a model_index.json of a known family) but whose weights do
    not load: the replica's own error, in one line."""
    folder = tmp_path / "broken"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"]}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    _one_line(_serve("--model", str(folder), "--port", str(_free_port()), timeout=300),
              "diffrt serve could not start its replicas: ")
