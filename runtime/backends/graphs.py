"""Capture of a whole denoising loop (all steps with the sampler's updates) as one CUDA graph per setting.

The sampler loop is free of host syncs, so it can be recorded once and replayed: later calls with the same
key copy their inputs into the captured buffers and replay every kernel of every step with one launch.

Correct by construction: the captured function may read only its input buffers (every per-call tensor is
an input: noise, conditioning, image latents, masks, masked-image latents) and what the key stands for (the
plan's host values, guidance, shapes, dtypes, the backend's patch state). :class:`ReplayEmulation` is the
same contract on any device (capture = keep the function and its static buffers; replay = copy the new
inputs in and call the function on the buffers), so the CPU tests prove what a CUDA replay would return.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class CapturedLoop:
    """A CUDA graph of ``fn(**inputs) -> Tensor`` over static input buffers."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], pool=None, warmup: int = 1):
        self.fn = fn  # keeps alive what the graph reads: coefficient tensors, weights
        self.static = {k: v.clone() for k, v in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: allocator pools, lazy inits, autotuning
            for _ in range(warmup):
                fn(**self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(**self.static)

    def __call__(self, **inputs) -> torch.Tensor:
        _copy_into(self.static, inputs)
        self.graph.replay()
        return self.output.clone()


class ReplayEmulation:
    """What a captured graph does, on any device: the function runs again on the same static buffers, so
    anything it took from outside its inputs is replayed as it was at capture."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], pool=None):
        self.fn = fn
        self.static = {k: v.clone() for k, v in inputs.items()}

    def __call__(self, **inputs) -> torch.Tensor:
        _copy_into(self.static, inputs)
        return self.fn(**self.static).clone()


def _copy_into(static: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
    if set(inputs) != set(static):
        raise ValueError(f"replay inputs {sorted(inputs)} differ from the captured {sorted(static)}")
    for name, value in inputs.items():
        static[name].copy_(value)


class LoopGraphCache:
    """Captured graphs by key, least recently used evicted past ``max_graphs``; one memory pool for all of a
    cache's CUDA graphs (they never run at once); a lock, so threads never capture or replay concurrently.
    The one capture cache: the whole loop of the triton backend, and the TensorRT backend's graph per input
    shape (``capture`` builds a graph from ``(fn, inputs, pool=)``; ``cuda_pool=False`` for the emulation)."""

    def __init__(self, max_graphs: int = 8, capture=CapturedLoop, cuda_pool: bool | None = None):
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
        self.max_graphs, self.capture = max_graphs, capture
        self.cuda_pool = capture is not ReplayEmulation if cuda_pool is None else cuda_pool
        self._graphs: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = None
        self.captures = 0  # how many graphs were captured (replays of a cached one do not count)

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: tuple, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]):
        """Replay the graph for ``key``, capturing ``fn`` over copies of ``inputs`` the first time."""
        key = (key, input_key(inputs))
        with self._lock:
            if key in self._graphs:
                self._graphs.move_to_end(key)
            else:
                while len(self._graphs) >= self.max_graphs:
                    self._graphs.popitem(last=False)  # the least recently used graph goes first
                log.info("capturing a CUDA graph of the %s (%d cached)", "denoising loop" if key[0][0] == "loop"
                         else "engine for these shapes", len(self._graphs) + 1)  # fmt: skip
                if self._pool is None and self.cuda_pool:
                    self._pool = torch.cuda.graph_pool_handle()
                self._graphs[key] = self.capture(fn, inputs, pool=self._pool)
                self.captures += 1
            return self._graphs[key](**inputs)

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()


def tensor_key(t: torch.Tensor) -> tuple:
    """Shape, dtype and device: what a graph depends on (values are copied in at replay)."""
    return (tuple(t.shape), t.dtype, str(t.device))


def input_key(inputs: dict[str, torch.Tensor]) -> tuple:
    return tuple((name, tensor_key(value)) for name, value in sorted(inputs.items()))
