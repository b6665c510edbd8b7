"""What every trainer shares: settings, device, seeding, the loop with its progress bar, EMA, result files.

Reproducibility: the model is initialised under ``torch.manual_seed(seed)``; every random draw of the
training itself (batch order, captions, noise, timesteps) comes from one CPU generator seeded with ``seed``,
so a run draws the same numbers on a CPU and on a GPU (the arithmetic still differs between devices).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import devices
from ..core.files import make_readable
from ..core.results import write_result

SIZES = ("full", "tiny")  # "tiny": a few-thousand-parameter model of the same classes, for smoke runs
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainSettings:
    """Settings every trainer has; each trainer's dataclass sets its own defaults (the shipped models')."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # after a linear warmup
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str | None = None  # default: cuda when present, else cpu
    amp: bool = True  # bfloat16 autocast on CUDA; on the CPU only where a trainer allows it (see ``autocast``)
    size: str = "full"
    data_limit: int | None = None  # first N training (and test) images only (smoke runs)
    data_root: str | None = None  # default: $DIFFRT_FASHION_MNIST or Debian's location

    def check(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.data_limit is not None and self.data_limit < 1:
            raise ValueError(f"data_limit must be a positive integer, got {self.data_limit}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a trainer returns: the output folder, the per-step losses and the recorded metrics."""

    folder: Path
    losses: list[float]
    metrics: dict


def resolve_device(name: str | None) -> torch.device:
    return devices.resolve_device(name)


def seeded_generator(seed: int) -> torch.Generator:
    """Seed the global RNG (model initialisation) and return the CPU generator for the training draws."""
    torch.manual_seed(seed)
    return torch.Generator("cpu").manual_seed(seed)


def autocast(device: torch.device, enabled: bool, cpu: bool = False):
    """bfloat16 autocast on CUDA, and on the CPU when ``cpu`` (the VAE's convolutions at 32x32 run 1.7x faster
    in bf16 on an AVX512-BF16 CPU; the small U-Nets do not gain, so they keep float32 there)."""
    if device.type == "cuda" and enabled and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and enabled and cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer(params, settings: TrainSettings):
    """AdamW with a linear warmup, then constant or cosine decay to zero."""
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup, total = settings.warmup_steps, settings.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if settings.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(loss: torch.Tensor, module: torch.nn.Module, opt, lr_sched, grad_clip: float) -> None:
    """Backward, clip the gradient norm, step the optimizer and the learning-rate schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()
    lr_sched.step()


class EMA:
    """An exponential moving average of a model's weights (the weights that get saved).

    With ``warmup`` the decay ramps up as ``(1 + step) / (10 + step)``, so early averages are not dominated by
    the random init; without it (LCM's target network, which starts as a trained model) it is fixed.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)


class Batches:
    """Index batches over ``n`` items: a fresh seeded permutation every epoch, so each item is seen once per epoch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if n < 1:
            raise ValueError("no training data")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self._order, self._pos = torch.empty(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            if self._pos >= len(self._order):
                self._order, self._pos = torch.randperm(self.n, generator=self.generator), 0
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            parts.append(take)
        return torch.cat(parts)


def train_loop(step_fn, steps: int, desc: str, progress: bool = True) -> list[float]:
    """Run ``step_fn(step) -> loss tensor`` ``steps`` times with a tqdm bar showing the smoothed loss.

    Losses are read back in chunks (one host sync per chunk, not per step); a non-finite loss stops the run.
    """
    from tqdm.auto import tqdm

    losses: list[float] = []
    pending: list[torch.Tensor] = []
    smooth = None
    chunk = 25
    with tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for step in range(steps):
            pending.append(step_fn(step).detach().float())
            if len(pending) == chunk or step == steps - 1:
                values = torch.stack(pending).cpu().tolist()
                pending.clear()
                bad = [v for v in values if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(f"{desc}: the loss became {bad[0]} by step {step + 1}; lower --lr")
                for v in values:
                    smooth = v if smooth is None else 0.98 * smooth + 0.02 * v
                losses += values
                bar.set_postfix(loss=f"{smooth:.4f}")
                bar.update(len(values))
    return losses


def loss_summary(losses: list[float]) -> dict:
    """First/last-window means of the loss curve (the window is a tenth of the run, 1 to 500 steps)."""
    window = max(1, min(500, len(losses) // 10))
    return {
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "loss_window": window,
        "loss_curve": [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 6)
                       for i in range(0, len(losses), window)],
    }  # fmt: skip


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def write_run(folder: Path, kind: str, settings: TrainSettings, metrics: dict) -> Path:
    """``train.json``: the settings and results with the environment stamp of diffrt's benchmark files."""
    make_readable(folder)
    return write_result(Path(folder) / "train.json", f"train-{kind}", settings.as_dict(), metrics)


def write_model_card(folder: Path, title: str, sections: dict[str, str]) -> Path:
    """``README.md``: a short model card (what it is, data, training, metrics, licence)."""
    lines = [f"# {title}", ""]
    for heading, text in sections.items():
        lines += [f"## {heading}", "", text.strip(), ""]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path


def run_summary(settings: TrainSettings, metrics: dict) -> str:
    """One line for a model card: steps, batch, wall time, device and the loss at the start and the end."""
    device = metrics["device"]
    if device == "cpu":
        device = f"cpu ({torch.get_num_threads()} threads)"
    return (f"{settings.steps} steps of batch {settings.batch_size} in {metrics['wall_s'] / 60:.1f} min on {device}; "
            f"mean loss over the first {metrics['loss_window']} steps {metrics['loss_first']:.4f}, "
            f"over the last {metrics['loss_window']} {metrics['loss_last']:.4f}.")


def settings_text(settings: TrainSettings) -> str:
    return "```json\n" + json.dumps(settings.as_dict(), indent=2) + "\n```"


DATA_CARD = (
    "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; MIT licence), read from Debian's `dataset-fashion-mnist` "
    "package: 60,000 training images, 28x28 grayscale, zero-padded to 32x32 and repeated to 3 channels."
)
