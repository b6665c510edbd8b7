"""The ``diffrt`` command line: argument parsing only; each command calls the library.

Errors a user can cause (ValueError, FileNotFoundError) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import defaults


def _add_bench(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (JSON results, tables, plots)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    from .bench import fid as bench_fid
    from .bench import kernels as bench_kernels
    from .bench import latency as bench_latency
    from .bench import report as bench_report
    from .bench import samplers as bench_samplers
    from .bench import throughput as bench_throughput

    bench_samplers.add_arguments(kinds.add_parser("samplers", help="sampler quality against NFE"))
    bench_kernels.add_arguments(kinds.add_parser("kernels", help="Triton kernels against torch (CUDA only)"))
    bench_latency.add_arguments(kinds.add_parser("latency", help="per-stage latency, backends side by side"))
    bench_throughput.add_arguments(kinds.add_parser("throughput", help="images/s against batch size"))
    bench_report.add_arguments(kinds.add_parser("report", help="markdown + HTML report with plots from results"))
    bench_fid.add_arguments(kinds.add_parser("fid", help="quality regression gate: domain FID and adherence"))


def _add_export(subparsers) -> None:
    from .export import cli as export_cli

    export_cli.add_arguments(subparsers.add_parser("export", help="export a model's graphs to ONNX or TensorRT"))


def _add_train(subparsers) -> None:
    from .train import cli as train_cli

    train_cli.add_arguments(subparsers.add_parser("train", help="train an embedded Fashion-MNIST model"))


def _add_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="the embedded models: list, export as diffusers folders, ship")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="embedded models in this installation").set_defaults(run=_models_list)
    export = actions.add_parser("export", help="write an embedded model as a complete diffusers folder")
    export.add_argument("name")
    export.add_argument("out")
    export.set_defaults(run=lambda a: _models_call("materialize", a.name, a.out))
    ship = actions.add_parser("ship", help="(developers) copy a `diffrt train` output into the package")
    ship.add_argument("trained", help="folder written by `diffrt train`")
    ship.add_argument("name", help="fashion, fashion-flow, fashion-lcm or fashion-classifier")
    ship.set_defaults(run=lambda a: _models_call("ship", a.trained, a.name))


def _models_list(args) -> int:
    from . import embedded

    present = embedded.shipped()
    for name in embedded.NAMES:
        where = embedded.MODELS_DIR / name if name in present else "not in this installation"
        print(f"{name:14s} {where}")
    return 0


def _models_call(function: str, *args) -> int:
    from . import embedded

    print(f"wrote {getattr(embedded, function)(*args)}")
    return 0


DEFAULT_MODEL = defaults.DEFAULT_MODEL


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text-to-image: write one PNG (a grid when -n > 1)")
    p.add_argument("prompt")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset name or a local diffusers folder")
    p.add_argument("--backend", default="torch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--sampler", default=None, help="default: the model's; see `diffrt samplers`")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--image", default=None, help="input picture for image-to-image / inpainting")
    p.add_argument("--strength", type=float, default=None, help="default 0.8 (image-to-image), 1 (inpainting)")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    p.add_argument("-o", "--out", default="out.png")
    p.set_defaults(run=_generate)


def _generate(args) -> int:
    from pathlib import Path

    from . import load

    images = {}
    for key in ("image", "mask"):
        if getattr(args, key):
            from PIL import Image

            path = Path(getattr(args, key))
            if not path.is_file():
                raise FileNotFoundError(f"--{key} {path}: no such file")
            images[key] = Image.open(path)
    pipe = load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    result = pipe.generate(
        args.prompt, args.negative, steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed,
        num_images=args.num_images, height=args.height, width=args.width, image=images.get("image"),
        mask_image=images.get("mask"), strength=args.strength,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(result.images).save(out)
    print(result.stages.summary())
    print(f"wrote {out} ({len(result.images)} image(s), seeds {result.seeds})")
    return 0


def image_grid(images):
    """Tile PIL images into one roughly square grid."""
    from PIL import Image

    cols = 1
    while cols * cols < len(images):
        cols += 1
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid


def _samplers(args) -> int:
    from . import samplers

    for name in samplers.available():
        sampler = samplers.get(name)
        options = ", ".join(sampler.options()) or "-"
        print(f"{name:16s} {sampler.summary}  [options: {options}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrt", description="diffusion inference runtime and benchmarks")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    subparsers.add_parser("samplers", help="list the samplers and their options").set_defaults(run=_samplers)
    _add_bench(subparsers)
    _add_export(subparsers)
    _add_train(subparsers)
    _add_models(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"diffrt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
