"""``diffrt serve`` on a real local Ray cluster, over real HTTP on 127.0.0.1.

Two applications run for the whole module: ``main`` (fashion-lcm, 2 replicas, batches of up to 8 images) and
``tight`` (fashion with fashion-lora, 1 replica, batches of 1, a queue of 1, a 0.3 s timeout) for LoRA scales
and the 503 and 504 paths. The
replica-kill test comes last: it leaves ``main`` with a replica being replaced.
"""

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the serve extra (pip install 'diffrt[serve]') is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster):
    from ray import serve

    from diffrt.serve import app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = app.Settings(model="fashion-lcm", replicas=2, replica_cpus=0.5, max_batch=8, batch_wait_s=0.05,
                        name="main")
    tight = app.Settings(model="fashion", replicas=1, replica_cpus=0.5, max_batch=1, max_queue=1, timeout_s=0.3,
                         name="tight", route_prefix="/tight", loras=(("fashion-lora", 1.0),))
    for settings in (main, tight):
        serve.run(app.build(settings, cpus=2, gpus=0), name=settings.name, route_prefix=settings.route_prefix)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "address": ray_cluster}
    serve.shutdown()


@pytest.fixture(scope="module")
def library():
    import diffrt

    return diffrt.load("fashion-lcm")


def call(url, body=None, data=None, timeout=60):
    """(status, parsed JSON or text, headers) of a GET (no body) or POST."""
    payload = data if data is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, payload, {"Content-Type": "application/json"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
        status, text, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        status, text, headers = err.code, err.read(), err.headers
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text.decode(), headers


def generate(server, body, prefix="", timeout=60):
    return call(f"{server['url']}{prefix}/v1/images/generations", body, timeout=timeout)


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@contextlib.contextmanager
def replica_threads():
    """The replicas here run one torch thread; float sums, hence the last bit of a pixel, can depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def library_pngs(library, prompt, seed, n=1, **options) -> list[bytes]:
    from diffrt.pipeline.outputs import encode

    with replica_threads():
        return [encode(image) for image in library(prompt, seed=seed, num_images=n, **options)]


def metric(server, name) -> float:
    _, text, _ = call(f"{server['url']}/metrics")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def in_parallel(function, items, timeout=120):
    """``function(item)`` for every item in its own thread; the results in order (None: it never returned)."""
    results = [None] * len(items)

    def work(index, item):
        results[index] = function(item)

    threads = [threading.Thread(target=work, args=(k, item), daemon=True) for k, item in enumerate(items)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


def test_health_and_models_report_the_loaded_model(server):
    status, health, _ = call(f"{server['url']}/health")
    assert status == 200 and health["status"] == "ready" and health["model"] == "fashion-lcm"
    status, models, _ = call(f"{server['url']}/v1/models")
    info = models["data"][0]
    assert status == 200 and info["id"] == "fashion-lcm"
    assert "lcm" in info["diffrt"]["samplers"] and info["diffrt"]["max_batch"] == 8


def test_a_seeded_request_alone_is_byte_identical_to_the_library_call(server, library):
    status, answer, _ = generate(server, {"prompt": "a coat", "seed": 5, "n": 2})
    assert status == 200, answer
    served = [base64.b64decode(item["b64_json"]) for item in answer["data"]]
    assert served == library_pngs(library, "a coat", 5, n=2)
    assert answer["diffrt"]["seeds"] == [5, 6] and [d["seed"] for d in answer["data"]] == [5, 6]
    assert answer["diffrt"]["settings"]["steps"] == 4 and answer["diffrt"]["settings"]["sampler"] == "lcm"
    assert answer["diffrt"]["batch"]["stages"]["denoise_ms"] > 0
    assert answer["created"] <= time.time() + 1


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(server, library):
    batches_before = metric(server, "diffrt_batch_requests_count")
    requests_before = metric(server, "diffrt_batch_requests_sum")
    prompts = ["a coat", "a bag", "an ankle boot", "a dress", "a sneaker", "a shirt", "a sandal", "a pullover"]
    bodies = [{"prompt": p, "seed": 100 + k} for k, p in enumerate(prompts * 2)]
    answers = in_parallel(lambda body: generate(server, body), bodies)
    assert all(a is not None and a[0] == 200 for a in answers), [a and a[:2] for a in answers]
    for body, (_, answer, _) in zip(bodies, answers, strict=True):
        served = base64.b64decode(answer["data"][0]["b64_json"])
        reference = library_pngs(library, body["prompt"], body["seed"])[0]
        # within one 8-bit level: float rounding differs with the batch a request shares (alone: identical)
        assert np.abs(pixels(served) - pixels(reference)).max() <= 1
    sizes = [a[1]["diffrt"]["batch"]["requests"] for a in answers]
    assert max(sizes) > 1, sizes
    batches = metric(server, "diffrt_batch_requests_count") - batches_before
    requests = metric(server, "diffrt_batch_requests_sum") - requests_before
    assert requests == len(bodies) and batches < len(bodies), (batches, requests)  # /metrics saw the batching
    assert metric(server, "diffrt_images_total") >= len(bodies)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": "x", "colour": 1}, "colour", "unknown field 'colour'"),
    ({"prompt": "x", "steps": 0}, "steps", "steps must be an integer >= 1, got 0"),
    ({"prompt": "x", "steps": 51}, "steps", "steps"),  # more than fashion-lcm was distilled for
    ({"prompt": "x", "size": "30x30"}, "size", "must be a multiple of 4"),
    ({"prompt": "x", "sampler": "magic"}, None, "unknown sampler 'magic'; available:"),
    ({"prompt": "x", "lora": {"style": 1.0}}, "lora", "no LoRA named 'style' is loaded on this server"),
    ({"prompt": "x", "seed": 2**64}, "seed", "seed"),
])
def test_bad_requests_get_400_with_the_library_message(server, body, param, words):
    status, answer, _ = generate(server, body)
    assert status == 400, answer
    assert words in answer["error"]["message"] and answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_gets_400(server):
    status, answer, _ = call(f"{server['url']}/v1/images/generations", data=b"{prompt: x")
    assert status == 400 and answer["error"]["message"].startswith("the body is not JSON")


def test_a_request_sets_a_loaded_lora_scale_by_name(server):
    import diffrt

    body = {"prompt": "a coat", "seed": 3, "steps": 2}
    answers = [generate(server, {**body, **extra}, prefix="/tight") for extra in ({}, {"lora": {"fashion-lora": 0}})]
    assert [a[0] for a in answers] == [200, 200], [a[:2] for a in answers]
    merged, off = (base64.b64decode(a[1]["data"][0]["b64_json"]) for a in answers)
    pipe = diffrt.load("fashion", loras=[("fashion-lora", 1.0)])
    assert [merged] == library_pngs(pipe, "a coat", 3, steps=2)
    pipe.set_loras({"fashion-lora": 0.0})
    assert [off] == library_pngs(pipe, "a coat", 3, steps=2) and off != merged
    assert answers[1][1]["diffrt"]["settings"]["lora"] == {"fashion-lora": 0.0}


def test_past_the_queue_limit_requests_get_503_with_retry_after(server):
    bodies = [{"prompt": "a coat", "seed": k, "n": 8} for k in range(4)]
    answers = in_parallel(lambda body: generate(server, body, prefix="/tight"), bodies)
    busy = [a for a in answers if a[0] == 503]
    assert busy, [a[:2] for a in answers]
    assert int(busy[0][2]["Retry-After"]) >= 1 and "max_queue 1" in busy[0][1]["error"]["message"]
    assert all(a[0] in (200, 503, 504) for a in answers)


def test_a_request_past_the_timeout_gets_504(server):
    status, answer, _ = generate(server, {"prompt": "a coat", "n": 8, "seed": 1}, prefix="/tight")
    assert status == 504 and "timeout of 0.3 s" in answer["error"]["message"]


def test_metrics_are_prometheus_text(server):
    _, text, _ = call(f"{server['url']}/metrics")
    for name in ("diffrt_requests_total", "diffrt_queue_depth", "diffrt_request_latency_seconds_bucket",
                 "diffrt_batch_images_bucket", "diffrt_images_per_second"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert metric(server, 'diffrt_requests_total{code="400"}'.split("{")[0]) > 0


def test_the_page_generates_an_image_in_headless_chromium(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.get(server["url"] + "/")
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#sampler option")) > 1)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a handbag")
        browser.find_element(By.ID, "seed").send_keys("42")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda b: (b.find_element(By.ID, "image").get_attribute("src") or "")
                                         .startswith("data:image/png;base64,") or b.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text == ""
        shown = base64.b64decode(browser.find_element(By.ID, "image").get_attribute("src").split(",", 1)[1])
        width = browser.execute_script("return document.getElementById('image').naturalWidth")
        assert width == 32 and shown.startswith(b"\x89PNG")
        assert "denoising" in browser.find_element(By.ID, "stages").text
        assert "42" in browser.find_element(By.ID, "stages").text  # the seed it ran with
    finally:
        browser.quit()


def test_bench_serve_runs_the_three_scenarios(server, tmp_path):
    from diffrt.cli import main
    from diffrt.core.results import read_result

    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--url", server["url"] + "/", "--count", "6", "--concurrency", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    record = read_result(out, kinds=("serve",))
    endpoint = record["metrics"]["endpoints"][server["url"] + "/"]
    assert set(endpoint) == {"single", "offline", "server"}
    assert endpoint["offline"]["images_per_s"] > 0 and endpoint["single"]["errors"] == 0
    assert endpoint["server"]["p99_s"] >= endpoint["server"]["p50_s"] > 0
    assert record["settings"]["servers"][server["url"] + "/"]["model"] == "fashion-lcm"


def test_sigterm_lets_in_flight_requests_finish(server):
    """``diffrt serve`` joining the cluster as its own application; SIGTERM while requests run."""
    command = [sys.executable, "-m", "diffrt.cli", "serve", "--model", "fashion-lcm", "--address",
               server["address"], "--name", "sig", "--route-prefix", "/sig", "--replica-cpus", "0.25",
               "--port", str(server["port"])]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        line = process.stdout.readline()
        assert line.startswith("diffrt serve: fashion-lcm"), line
        bodies = [{"prompt": "a coat", "seed": k, "n": 4} for k in range(6)]
        results = [None] * len(bodies)

        def work(k):
            results[k] = generate(server, bodies[k], prefix="/sig")

        threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(bodies))]
        for t in threads:
            t.start()
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        assert [r[0] for r in results] == [200] * len(bodies), [r and r[:2] for r in results]
        assert process.wait(90) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_killed_replica_fails_nothing_silently(server, library):
    """SIGKILL one of main's two replicas mid-requests: each answer is right (200, retried elsewhere) or a
    clear 5xx, and none hangs."""
    from ray import serve

    handle = serve.get_deployment_handle("Generator", app_name="main")
    pids = set()
    for _ in range(40):
        pids.add(handle.info.remote().result()["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2
    retries_before = metric(server, "diffrt_replica_retries_total")
    bodies = [{"prompt": "a dress", "seed": 300 + k, "n": 8} for k in range(16)]  # ~2 s of work per replica
    results = [None] * len(bodies)

    def work(k):
        results[k] = generate(server, bodies[k], timeout=120)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(bodies))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(sorted(pids)[0], signal.SIGKILL)
    for t in threads:
        t.join(150)
    assert all(r is not None for r in results), "a request hung"
    for body, (status, answer, _) in zip(bodies, results, strict=True):
        assert status == 200 or (status >= 500 and answer["error"]["message"]), (status, answer)
        if status == 200:
            served = base64.b64decode(answer["data"][5]["b64_json"])
            reference = library_pngs(library, body["prompt"], body["seed"] + 5)[0]
            assert np.abs(pixels(served) - pixels(reference)).max() <= 1
    assert metric(server, "diffrt_replica_retries_total") > retries_before  # the dead replica had requests
    assert sum(r[0] == 200 for r in results) >= len(bodies) // 2, [r[0] for r in results]
