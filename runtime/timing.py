"""Stage times of a pipeline call, taken without host syncs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StageTimes:
    """Wall times (ms) of one call's stages: the numbers ``diffrt generate`` prints."""

    text_encode_ms: float = 0.0
    unet_calls_ms: list[float] = field(default_factory=list)  # one per U-Net call; empty for a CUDA graph
    denoise_ms: float = 0.0  # the whole sampling loop, U-Net calls and sampler updates
    vae_encode_ms: float = 0.0
    vae_decode_ms: float = 0.0
    total_ms: float = 0.0

    def summary(self) -> str:
        steps = ", ".join(f"{t:.1f}" for t in self.unet_calls_ms) if self.unet_calls_ms else "one CUDA graph"
        lines = [f"text encoding   {self.text_encode_ms:9.1f} ms"]
        if self.vae_encode_ms:
            lines.append(f"vae encode      {self.vae_encode_ms:9.1f} ms")
        lines += [
            f"denoising       {self.denoise_ms:9.1f} ms  ({len(self.unet_calls_ms)} U-Net calls: {steps})",
            f"vae decode      {self.vae_decode_ms:9.1f} ms",
            f"total           {self.total_ms:9.1f} ms",
        ]
        return "\n".join(lines)


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
