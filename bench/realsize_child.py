"""One path of ``diffrt bench realsize`` on one model, in a fresh process: PATH MODEL WORKDIR SETTINGS REPORT.

SETTINGS is a JSON object (``size``, ``dtype``, ``steps``, ``prompt``); what the path measured goes to REPORT as
JSON. Files that later paths read (the torch call's images, the ONNX exports, the AOT cache) live in WORKDIR.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _load(model: str, settings: dict, **options):
    import diffrt

    start = time.perf_counter()
    pipe = diffrt.load(model, device="cpu", dtype=settings["dtype"], **options)
    return pipe, time.perf_counter() - start


def _call(pipe, settings: dict, steps: int | None = None, output_type: str = "np", **options):
    size = settings["size"]
    return pipe.generate(settings["prompt"], steps=steps or settings["steps"], seed=0, height=size, width=size,
                         output_type=output_type, **options)  # fmt: skip


def _stages(result) -> dict:
    stages = result.stages
    return {"text_s": stages.text_encode_ms / 1e3, "denoise_s": stages.denoise_ms / 1e3,
            "denoiser_calls_s": [ms / 1e3 for ms in stages.unet_calls_ms], "decode_s": stages.vae_decode_ms / 1e3,
            "total_s": stages.total_ms / 1e3}  # fmt: skip


def _weights_gb(pipe) -> float:
    parts = pipe.components
    modules = [parts.denoiser, parts.vae, *parts.text_encoders, *parts.controlnets]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 1e9


def load(model, work, settings) -> dict:
    pipe, seconds = _load(model, settings)
    return {"load_s": seconds, "weights_gb": _weights_gb(pipe)}


def step(model, work, settings) -> dict:
    pipe, seconds = _load(model, settings)
    return {"load_s": seconds, **_stages(_call(pipe, settings, steps=1, output_type="latent"))}


def call(model, work, settings) -> dict:
    import numpy as np

    pipe, seconds = _load(model, settings)
    result = _call(pipe, settings)
    np.save(work / "torch-call.npy", result.images)
    return {"load_s": seconds, **_stages(result), "sampler": result.sampler}


def onnx_export(precision: str):
    def run(model, work, settings) -> dict:
        from diffrt.export import export_onnx

        pipe, seconds = _load(model, settings)
        start = time.perf_counter()
        manifest = export_onnx(pipe, work / f"onnx-{precision}", precision=precision)
        graphs = {name: {"export_s": g["export_seconds"], "parity": g["parity"]["max_rel_error"],
                         "onnx_mb": g["onnx"]["bytes"] / 1e6, "data_gb": (g["data"] or {}).get("bytes", 0) / 1e9}
                  for name, g in manifest["graphs"].items()}  # fmt: skip
        return {"load_s": seconds, "export_s": time.perf_counter() - start, "exporter": manifest["exporter"],
                "deployable": "deployment" in manifest, "graphs": graphs}  # fmt: skip

    return run


FP16_PIXELS = 0.15  # torch fp32 against an fp16 ONNX graph, random weights, whole call: what fp16 accumulates
FP32_PIXELS = 0.02


def onnxruntime(precision: str):
    def run(model, work, settings) -> dict:
        import numpy as np

        folder = work / f"onnx-{precision}"
        if json.loads((folder / "manifest.json").read_text()).get("deployment"):
            pipe, seconds = _load(str(folder), {**settings, "dtype": None}, backend="onnxruntime")
        else:  # transformer families: the graphs with the model beside them (loaded as they were exported)
            pipe, seconds = _load(model, settings, backend="onnxruntime", onnx_dir=str(folder), precision=precision)
        result = _call(pipe, settings)
        reference = np.load(work / "torch-call.npy")
        difference = float(np.abs(result.images - reference).max())
        bound = FP32_PIXELS if precision == "fp32" else FP16_PIXELS
        if not difference <= bound:
            raise AssertionError(f"onnxruntime {precision} differs from torch by {difference:.3g} (bound {bound})")
        return {"load_s": seconds, **_stages(result), "max_pixel_difference": difference,
                "deployed": pipe.components.deployed is not None}  # fmt: skip

    return run


def aot(model, work, settings) -> dict:
    pipe, seconds = _load(model, settings, backend="compile", aot=True)
    start = time.perf_counter()
    result = _call(pipe, settings, steps=1, output_type="latent")
    return {"load_s": seconds, "first_call_s": time.perf_counter() - start, **_stages(result)}


def lora(model, work, settings) -> dict:
    from diffrt.bench.lora import random_loras

    pipe, seconds = _load(model, settings)
    paths = random_loras(model, 64, work, "cpu", components=pipe.components, layers="linear", count=1)
    start = time.perf_counter()
    name = pipe.load_lora(paths[0])
    loaded = time.perf_counter()
    pipe.set_loras({name: 0.5})
    switched = time.perf_counter()
    result = _call(pipe, settings, steps=1, output_type="latent")
    info = pipe.loras[name]
    return {"load_s": seconds, "lora_load_s": loaded - start, "lora_switch_s": switched - loaded,
            "lora_layers": info["layers"], "lora_file_mb": paths[0].stat().st_size / 1e6, **_stages(result)}


def controlnet(model, work, settings) -> dict:
    import torch

    pipe, seconds = _load(model, settings, controlnet="random")
    control = torch.rand(1, 3, settings["size"], settings["size"], generator=torch.Generator().manual_seed(0))
    result = _call(pipe, settings, steps=1, output_type="latent", control_image=control)
    return {"load_s": seconds, "controlnet_gb": sum(p.numel() * p.element_size()
                                                    for p in pipe.components.controlnets[0].parameters()) / 1e9,
            **_stages(result)}  # fmt: skip


def cache(model, work, settings) -> dict:
    pipe, seconds = _load(model, settings)
    spec = "fbcache:threshold=0.1" if pipe.components.transformer is not None else "deepcache:interval=2"
    result = _call(pipe, settings, steps=3, output_type="latent", cache=spec)
    return {"load_s": seconds, "cache": spec, "full_calls": result.stages.full_calls,
            "cached_calls": result.stages.cached_calls, **_stages(result)}  # fmt: skip


def serve(model, work, settings) -> dict:
    """``diffrt serve`` on a local Ray cluster answering one request; the server's processes are this one's
    children, so the parent's memory sampling counts them."""
    import base64
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    size = settings["size"]
    command = [sys.executable, "-m", "diffrt.cli", "serve", "--model", model, "--port", str(port), "--device", "cpu",
               "--timeout", "3000"]  # fmt: skip
    if settings["dtype"]:
        command += ["--dtype", settings["dtype"]]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "w"))
    start = time.perf_counter()
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"diffrt serve exited with {server.returncode}: see {work / 'serve.log'}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        ready = time.perf_counter()
        body = json.dumps({"prompt": settings["prompt"], "size": f"{size}x{size}", "steps": 1, "seed": 0,
                           "response_format": "b64_json"}).encode()  # fmt: skip
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=3000) as response:
            answer = json.loads(response.read())
        answered = time.perf_counter()
        png = base64.b64decode(answer["data"][0]["b64_json"])
        return {"startup_s": ready - start, "request_s": answered - ready, "png_kb": len(png) / 1e3}
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()


PATHS = {
    "load": load, "step": step, "call": call,
    "onnx-fp32": onnx_export("fp32"), "onnxruntime-fp32": onnxruntime("fp32"),
    "onnx-fp16": onnx_export("fp16"), "onnxruntime-fp16": onnxruntime("fp16"),
    "aot": aot, "aot-warm": aot, "lora": lora, "controlnet": controlnet, "cache": cache, "serve": serve,
}  # fmt: skip


def main(path: str, model: str, work: str, settings: str, report: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = PATHS[path](model, Path(work), json.loads(settings))
    Path(report).write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: a path's time ends with its work


if __name__ == "__main__":
    main(*sys.argv[1:6])
