"""Stage times of a pipeline call, taken without host syncs."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LISTED_CALLS = 8  # U-Net call times listed one by one up to this many


@dataclass
class StageTimes:
    """Wall times (ms) of one call's stages: the numbers ``diffrt generate`` prints."""

    text_encode_ms: float = 0.0
    unet_calls_ms: list[float] = field(default_factory=list)  # one per U-Net call; empty for a CUDA graph
    denoise_ms: float = 0.0  # the whole sampling loop, U-Net calls and sampler updates
    vae_encode_ms: float = 0.0
    vae_decode_ms: float = 0.0
    total_ms: float = 0.0
    full_calls: int | None = None  # under a step cache: the model calls computed fully (None: no cache)
    cached_calls: int = 0  # ... and those that reused cached work

    def summary(self) -> str:
        lines = [f"text encoding   {self.text_encode_ms:9.1f} ms"]
        if self.vae_encode_ms:
            lines.append(f"vae encode      {self.vae_encode_ms:9.1f} ms")
        lines += [
            f"denoising       {self.denoise_ms:9.1f} ms  ({self._unet_calls()}{self._cache()})",
            f"vae decode      {self.vae_decode_ms:9.1f} ms",
            f"total           {self.total_ms:9.1f} ms",
        ]
        return "\n".join(lines)

    def _cache(self) -> str:
        if self.full_calls is None:
            return ""
        return f"; step cache: {self.full_calls} full, {self.cached_calls} cached"

    def _unet_calls(self) -> str:
        """Each call's time up to ``LISTED_CALLS`` calls, else their count, median and range."""
        calls = self.unet_calls_ms
        if not calls:
            return "one CUDA graph"
        if len(calls) <= LISTED_CALLS:
            return f"{len(calls)} model calls: " + ", ".join(f"{t:.1f}" for t in calls)
        return (f"{len(calls)} model calls: median {statistics.median(calls):.1f} ms, "
                f"min {min(calls):.1f}, max {max(calls):.1f}")  # fmt: skip


class Clock:
    """Timestamps without host syncs: CUDA events on CUDA (read once at the end), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1000.0


class ProgressLines:
    """Progress where there is no terminal for a bar (logs, pipes, CI): a plain INFO line every ``every_s``
    seconds of a long run, none for a short one. Same interface as the tqdm bar it stands in for."""

    def __init__(self, total: int, desc: str, every_s: float = 10.0):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %d/%d (%.0f s)", self.desc, self.done, self.total, now - self.start)
