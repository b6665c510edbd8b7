"""One cold-start run (``diffrt bench coldstart`` spawns it): SOURCE BACKEND PROMPT IMAGE REPORT START.

Times its phases from the first line that runs (the interpreter's own start is in the parent's wall time):
importing torch and diffrt, ``diffrt.load``, the first call, writing the PNG; the times go to REPORT as JSON.
It imports only what those steps need, as a user's first call would. START ``fast`` imports and loads inside
``diffrt.fast_start()`` (as ``diffrt generate`` does); ``plain`` leaves the garbage collector alone.
"""

import time

START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def main(source: str, backend: str, prompt: str, image: str, report: str, start: str) -> None:
    import contextlib

    import diffrt
    from diffrt.core.backend_spec import parse as parse_backend

    with diffrt.fast_start() if start == "fast" else contextlib.nullcontext():
        import torch  # noqa: F401  (timed here: every setup needs it)

        imported = time.perf_counter()
        name, options = parse_backend(backend)
        pipe = diffrt.load(source, backend=name, device="cpu", **options)
        loaded = time.perf_counter()
    picture = pipe(prompt, seed=0)[0]
    called = time.perf_counter()
    picture.save(image)
    written = time.perf_counter()
    phases = {"import_s": imported - START, "load_s": loaded - imported, "first_call_s": called - loaded,
              "write_s": written - called,
              "imported": sorted(m for m in ("diffusers", "transformers", "onnx") if m in sys.modules)}  # fmt: skip
    with open(report, "w") as f:
        json.dump(phases, f)
    sys.stdout.flush()
    os._exit(0)  # as the diffrt command ends (diffrt.cli.console_main): no interpreter teardown


if __name__ == "__main__":
    main(*sys.argv[1:7])
