"""``diffrt bench lora``: what LoRAs cost per backend: loading, switching between two, unloading, and the
denoiser step with an adapter merged against none (interleaved, one pipeline per backend).

Every adapter is merged into the weights (:mod:`diffrt.models.lora`), so an active one should cost nothing per step on
the torch-based backends; on onnxruntime a session that overrides a convolution's weight runs one optimization
level lower (see ``OnnxRuntimeBackend.open_runner``), and the table says what that costs. For the torch backend
the run also times PEFT's unmerged layers (the low-rank path diffusers runs) on the same U-Net, the alternative
to merging. ``--effect LABEL`` adds the trained adapter's measured effect: the share of images the fashion
classifier puts in class LABEL for ``--prompt``, with and without the adapter, same seeds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

from .harness import add_call_arguments, fill_call_defaults, percentiles, write_result

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="fashion", help="embedded model, preset or diffusers folder")
    parser.add_argument("--backend", default="torch,onnxruntime", help="comma list of backends")
    parser.add_argument("--lora", action="append", default=[], help="a LoRA file or folder; give two to time "
                        "switching between them (the first is used alone otherwise)")  # fmt: skip
    parser.add_argument("--random-rank", type=int, default=None, metavar="R",
                        help="instead of --lora: two random rank-R LoRAs on every attention projection of the "
                             "model's denoiser (e.g. an SD1.5-size rank-64 switch)")  # fmt: skip
    add_call_arguments(parser)
    parser.add_argument("--repeat", type=int, default=10, help="timed switches and calls per backend")
    parser.add_argument("--prompt", default="a piece of clothing")
    parser.add_argument("--effect", type=int, default=None, metavar="LABEL",
                        help="also measure the first LoRA's effect: fashion-classifier share of class LABEL")
    parser.add_argument("--samples", type=int, default=200, help="images per arm of --effect")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="lora.json", help="JSON result file")
    parser.set_defaults(run=run)


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _step_ms(pipe, args) -> float:
    result = pipe.generate(args.prompt, steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=0)
    return statistics.median(result.stages.unet_calls_ms)


def measure_backend(backend: str, args) -> dict:
    from .. import load

    pipe = load(args.model, device=args.device, dtype=args.dtype, backend=backend)
    fill_call_defaults(args, pipe)
    _step_ms(pipe, args)  # warm
    unmerged = _unmerged_unet(pipe, args) if backend == "torch" else None  # copied before any merge
    names = ["a", "b"][: len(args.lora)]
    load_ms = [_ms(lambda n=n, p=p: pipe.load_lora(p, name=n, scale=1.0 if n == "a" else 0.0))
               for n, p in zip(names, args.lora, strict=True)]  # fmt: skip
    capture = getattr(pipe.backend, "loop_capture", None)  # the captured loops: a switch must not add any
    graphs_before = len(capture) if capture is not None else None
    switch, base_steps, active_steps, unmerged_steps = [], [], [], []
    for r in range(args.repeat):
        if len(names) == 2:  # a -> b or b -> a: the same layers, other weights
            on, off = ("b", "a") if r % 2 == 0 else ("a", "b")
            switch.append(_ms(lambda on=on, off=off: pipe.set_loras({on: 1.0, off: 0.0})))
        active_steps.append(_step_ms(pipe, args))
        pipe.set_loras(dict.fromkeys(names, 0.0))  # nothing active: the base model
        base_steps.append(_step_ms(pipe, args))
        if unmerged is not None:
            unmerged_steps.append(_step_ms_with_unet(pipe, args, unmerged))
        pipe.set_loras({"a": 1.0})
    unload_ms = sum(_ms(lambda n=n: pipe.unload_lora(n)) for n in names)
    return {"load_ms": load_ms, "switch_ms": percentiles(switch) if switch else None, "unload_ms": unload_ms,
            "step_ms_base": percentiles(base_steps), "step_ms_active": percentiles(active_steps),
            "step_ms_unmerged_peft": percentiles(unmerged_steps) if unmerged_steps else None,
            "captured_loops": None if capture is None else {"before": graphs_before,
                                                            "after": len(capture)}}  # fmt: skip


def _unmerged_unet(pipe, args):
    """A copy of the U-Net with PEFT's unmerged LoRA layers for the first adapter (``y = W x + s B A x``, what
    diffusers runs): timed in the same rounds as the merged weights. None without peft, for a transformer
    family or for a file without PEFT's saved settings."""
    from ..core import optional
    from ..models import lora

    if not optional.installed("peft") or pipe.components.denoiser_name != "unet":
        return None
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    tensors, settings = lora.read(args.lora[0])
    layers = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    saved = settings.get("unet")
    if not layers or not saved or not all(".lora_A." in k or ".lora_B." in k for k in layers):
        return None
    config = LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], target_modules=saved["target_modules"])
    unmerged = inject_adapter_in_model(config, copy.deepcopy(pipe.components.unet))
    set_peft_model_state_dict(unmerged, layers)
    return unmerged


def _step_ms_with_unet(pipe, args, unet) -> float:
    module = pipe.backend.modules[pipe.model.denoiser_part]
    original = module.unet
    module.unet = unet
    try:
        return _step_ms(pipe, args)
    finally:
        module.unet = original


def measure_effect(args) -> dict:
    from .. import load
    from .quality import adherence

    pipe = load(args.model, device=args.device)
    fill_call_defaults(args, pipe)
    options = dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=0, output_type="pt")
    labels = [args.effect] * args.samples
    without = adherence(_images(pipe, args, options), labels)
    pipe.load_lora(args.lora[0], name="a")
    with_lora = adherence(_images(pipe, args, options), labels)
    return {"label": args.effect, "prompt": args.prompt, "samples": args.samples, "share_without": without,
            "share_with": with_lora}  # fmt: skip


def _images(pipe, args, options):
    import torch

    return torch.cat([result.images for result in pipe.generate_batches(args.prompt, num_images=args.samples,
                                                                         batch_size=50, **options)])  # fmt: skip


def random_loras(model: str, rank: int, folder: Path, device: str, *, components=None, layers: str = "attention",
                 count: int = 2) -> list[Path]:  # fmt: skip
    """``count`` random rank-``rank`` LoRAs (diffusers/PEFT keys) on every attention projection (``layers=
    "attention"``) or every linear layer (``"linear"``) of ``model``'s denoiser: what a switch costs at that
    model's size, without a file to hand. ``components``: the loaded model, when there is one."""
    import torch
    from safetensors.torch import save_file

    from ..models import families, presets
    from ..models.loading import load_components

    if components is not None:
        part, denoiser = components.denoiser_name, components.denoiser
    elif presets.is_preset(model):  # only the layer shapes are needed: built on the meta device, nothing allocated
        preset = presets.resolve(model)
        denoiser = presets.build_modules(preset, device="meta")[0]
        part = families.get(preset.family).denoiser_part
    else:
        components = load_components(model, dtype=torch.float32, device="cpu")
        part, denoiser = components.denoiser_name, components.denoiser
    targets = [(name, m) for name, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)
               and (layers == "linear" or name.endswith(ATTENTION_PROJECTIONS))]  # fmt: skip
    paths = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, module in targets:
            tensors[f"{part}.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) / 8
            tensors[f"{part}.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) / 64
        paths.append(folder / f"random-{layers}-rank{rank}-{seed}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths


def run(args) -> int:
    import tempfile

    if args.random_rank is not None:
        if args.lora:
            raise ValueError("give --lora files or --random-rank, not both")
        if args.random_rank < 1:
            raise ValueError(f"--random-rank must be >= 1, got {args.random_rank}")
        with tempfile.TemporaryDirectory() as tmp:
            args.lora = [str(p) for p in random_loras(args.model, args.random_rank, Path(tmp), args.device)]
            return _run(args)
    return _run(args)


def _run(args) -> int:
    if not 1 <= len(args.lora) <= 2:
        raise ValueError(f"--lora takes one or two adapters (or use --random-rank), got {len(args.lora)}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    metrics = {"backends": {backend: measure_backend(backend, args) for backend in backends}}
    if args.effect is not None:
        metrics["effect"] = measure_effect(args)
    settings = {k: getattr(args, k) for k in ("model", "lora", "random_rank", "steps", "sampler", "guidance",
                                              "repeat", "prompt", "device", "dtype")}  # fmt: skip
    path = write_result(args.out, "lora", settings, metrics)
    print(table(metrics))
    print(f"wrote {path}")
    return 0


def table(metrics: dict) -> str:
    rows = ["| backend | load ms | switch ms (p50) | unload ms | step ms base | step ms active | step ms unmerged |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in metrics["backends"].items():
        switch = f"{m['switch_ms']['p50']:.1f}" if m["switch_ms"] else "-"
        unmerged = m.get("step_ms_unmerged_peft")
        unmerged = f"{unmerged['p50']:.2f}" if unmerged else "-"
        loads = " / ".join(f"{v:.0f}" for v in m["load_ms"])
        rows.append(f"| {name} | {loads} | {switch} | {m['unload_ms']:.0f} | {m['step_ms_base']['p50']:.2f} "
                    f"| {m['step_ms_active']['p50']:.2f} | {unmerged} |")  # fmt: skip
    effect = metrics.get("effect")
    if effect:
        rows.append(f"\neffect: class {effect['label']} share for {effect['prompt']!r}: {effect['share_without']:.3f} "
                    f"without, {effect['share_with']:.3f} with ({effect['samples']} images)")
    return "\n".join(rows)
