"""How a serving replica and a batch worker start: torch's thread count, the pipeline loaded inside
``diffrt.fast_start()`` (the process keeps it), and the settings a request or row leaves to the model. The
backend may carry options as on the command line (``compile:aot=true``). No Ray here."""

from __future__ import annotations

import re

from ..core.backend_spec import parse as parse_backend
from ..core.startup import fast_start


def start_pipeline(settings, threads: int | None, **load_options):
    """(pipeline, the defaults a request leaves out) for ``settings`` (``model``, ``backend``, ``device``,
    ``dtype``); ``threads``: torch threads, None leaves torch's own count."""
    import torch

    from .. import load

    if threads:
        torch.set_num_threads(threads)
    backend, backend_options = parse_backend(settings.backend)
    with fast_start():
        pipe = load(settings.model, backend=backend, device=settings.device, dtype=settings.dtype, **load_options,
                    **backend_options)  # fmt: skip
    size = pipe.default_size
    return pipe, {**pipe.defaults, "width": size, "height": size}


def preflight(settings, loras=(), host: str | None = None, port: int | None = None) -> None:
    """What can be checked in the command's own process before Ray starts, so a mistake is one line (exit 2)
    rather than a worker's traceback: the model (named, or a folder of a family diffrt runs), the backend and
    its options, each LoRA file (readable, every tensor finite and shaped), the port (free to listen on)."""
    import socket

    from ..backends import check as check_backend
    from ..models.loading import resolve
    from ..models.lora import check_file

    resolve(settings.model)
    check_backend(*parse_backend(settings.backend))
    for path, _ in loras:
        check_file(path)
    if port is not None:
        with socket.socket() as probe:
            try:
                probe.bind((host or "127.0.0.1", port))
            except OSError as err:
                raise ValueError(f"cannot listen on {host}:{port}: {err.strerror} (is another server there? give "
                                 "--port)") from None  # fmt: skip


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)): (.+)$")


def startup_error(err: Exception) -> str:
    """One line for an error Ray reports from a replica or worker that failed to start: the last
    ``SomethingError: message`` line of its traceback (the replica's own), else the first line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    found = [m for m in map(_ERROR_LINE.match, lines) if m and "ray" not in m.group(1).lower()]
    if found:
        return f"{found[-1].group(1)}: {found[-1].group(2).strip()}"
    return lines[0].strip() if lines else type(err).__name__
