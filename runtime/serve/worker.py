"""How a serving replica and a batch worker start: torch's thread count, the pipeline loaded inside
``diffrt.fast_start()`` (the process keeps it), and the settings a request or row leaves to the model. The
backend may carry options as on the command line (``compile:aot=true``). No Ray here."""

from __future__ import annotations

from ..backend_spec import parse as parse_backend
from ..startup import fast_start


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
