"""The ``diffrt`` command line: argument parsing only; each command calls the library.

Errors a user can cause (bad values, missing or malformed files, unwritable outputs, missing optional
packages) print as one line naming what was wrong and exit with status 2. Where a command writes (``--out``,
``-o``) is checked before it starts the work.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..core import defaults
from ..core.version import __version__

# what each command's --out is: checked writable before the command runs (generate checks its own -o forms)
FILE, FOLDER, NEW_FOLDER = "file", "folder", "new folder"


def _add_bench(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (JSON results, tables, plots)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    from ..bench import cache as bench_cache
    from ..bench import coldstart as bench_coldstart
    from ..bench import controlnet as bench_controlnet
    from ..bench import fid as bench_fid
    from ..bench import gpu_suite as bench_gpu
    from ..bench import kernels as bench_kernels
    from ..bench import latency as bench_latency
    from ..bench import lora as bench_lora
    from ..bench import realsize as bench_realsize
    from ..bench import report as bench_report
    from ..bench import samplers as bench_samplers
    from ..bench import serve as bench_serve
    from ..bench import throughput as bench_throughput

    commands = (
        (bench_samplers, "samplers", "sampler quality against NFE", FILE),
        (bench_kernels, "kernels", "Triton kernels against torch (CUDA only)", FILE),
        (bench_latency, "latency", "per-stage latency, backends side by side", FILE),
        (bench_throughput, "throughput", "images/s against batch size", FILE),
        (bench_report, "report", "markdown + HTML report with plots from results", FOLDER),
        (bench_fid, "fid", "quality regression gate: domain FID and adherence", FILE),
        (bench_cache, "cache", "step caching against fewer steps: time, adherence, domain FID", FILE),
        (bench_lora, "lora", "LoRA load, switch and unload times, step cost with an adapter, its effect", FILE),
        (bench_controlnet, "controlnet", "ControlNet: edge agreement with the control and adherence, with and "
         "without it", FILE),
        (bench_serve, "serve", "load scenarios against diffrt serve endpoints: SingleStream, Offline, Server", FILE),
        (bench_coldstart, "coldstart", "fresh process to first image: per backend, caches cold and warm", FILE),
        (bench_gpu, "gpu", "every GPU check and measurement in one time-boxed run (a dry run without CUDA)", FOLDER),
        (bench_realsize, "realsize", "every path on the published architectures: pass/fail, time, peak memory", FILE),
    )
    for module, name, help_text, out_kind in commands:
        parser = kinds.add_parser(name, help=help_text)
        module.add_arguments(parser)
        parser.set_defaults(out_kind=out_kind)


def _add_export(subparsers) -> None:
    from . import export as export_cli

    parser = subparsers.add_parser("export", help="export a model's graphs to ONNX or TensorRT")
    export_cli.add_arguments(parser)
    parser.set_defaults(out_kind=FOLDER)


def _add_train(subparsers) -> None:
    from . import train as train_cli

    parser = subparsers.add_parser("train", help="train an embedded Fashion-MNIST model")
    train_cli.add_arguments(parser)
    parser.set_defaults(out_kind=FOLDER)


def _add_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="the embedded models: list, export as diffusers folders, ship")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="embedded models in this installation").set_defaults(run=_models_list)
    export = actions.add_parser("export", help="write an embedded model as a complete diffusers folder")
    export.add_argument("name")
    export.add_argument("out")
    export.set_defaults(run=lambda a: _models_call("materialize", a.name, a.out), out_kind=NEW_FOLDER)
    ship = actions.add_parser("ship", help="(developers) copy a `diffrt train` output into the package")
    ship.add_argument("trained", help="folder written by `diffrt train`")
    ship.add_argument("name", help="fashion, fashion-flow, fashion-lcm, fashion-dit, fashion-classifier, fashion-lora "
                      "or fashion-controlnet")
    ship.set_defaults(run=lambda a: _models_call("ship", a.trained, a.name))


def _models_list(args) -> int:
    from ..models import embedded

    present = embedded.shipped()
    for name in embedded.NAMES:
        where = embedded.MODELS_DIR / name if name in present else "not in this installation"
        print(f"{name:14s} {where}")
    return 0


def _models_call(function: str, *args) -> int:
    from ..models import embedded

    print(f"wrote {getattr(embedded, function)(*args)}")
    return 0


DEFAULT_MODEL = defaults.DEFAULT_MODEL
PROGRESS_EVERY_S = 5.0  # a batched run prints how far it is at most this often
BACKEND_HELP = (f"{', '.join(defaults.BACKENDS)} (default: torch), with options as NAME:KEY=VALUE "
                "(compile:aot=true: compiled ahead of time, loaded by later runs)")
OUT_HELP = ("an image file (one image, or a grid of all of them: at most 64), a folder ending in / (one PNG per "
            "image, written as each batch finishes), or a pattern with {i} and/or {seed} such as shots/{seed}.jpg "
            "(default: out.png)")  # fmt: skip


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text-to-image (and image-to-image, inpainting): image files")
    p.add_argument("prompt")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"an embedded model ({', '.join(defaults.EMBEDDED_MODELS)}; no download), a random-weight "
                        f"preset (sd15, sdxl, sd3-medium, flux-dev, tiny, ...) or a local diffusers folder "
                        f"(SD 1.x/2.x, SDXL, SD3, FLUX.1; default: {DEFAULT_MODEL})")
    p.add_argument("--backend", default="torch", help=BACKEND_HELP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--sampler", default=None, help="default: the model's (a diffusers folder's: 'scheduler', its own "
                   "scheduler, sampled as diffusers does); see `diffrt samplers`")  # fmt: skip
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (FLUX.1-dev: its "
                   "distilled guidance, an input of the model)")  # fmt: skip
    p.add_argument("--true-cfg", type=float, default=1.0, help="FLUX.1-dev: classifier-free guidance on top, with "
                   "--negative (default 1: off)")  # fmt: skip
    p.add_argument("--max-sequence-length", type=int, default=None, help="SD3, FLUX.1: T5 tokens (default: the "
                   "model's; longer prompts are truncated with a warning)")  # fmt: skip
    p.add_argument("--cache", default=None, help="a step cache: deepcache:interval=3[,depth=1,warmup=1] (U-Nets) "
                   "or fbcache:threshold=0.1 / fbcache:interval=2 (transformers); default: none")  # fmt: skip
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA (.safetensors, or a folder holding pytorch_lora_weights.safetensors; diffusers/PEFT "
                        "or kohya keys) merged at SCALE (default 1); repeat for several")  # fmt: skip
    p.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding (.safetensors: emb_params, clip_l/clip_g or diffusers' "
                        "{token: vectors}); its token is the file's own, else the file name; repeatable")  # fmt: skip
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a diffusers ControlNet folder (SD 1.x/2.x, SDXL) or an embedded one (fashion-controlnet); "
                        "repeat for several, each with its --control-image")  # fmt: skip
    p.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="the control picture (edge map, depth map, ...) of each --controlnet, in order")
    p.add_argument("--control-scale", type=float, action="append", default=[], metavar="S",
                   help="each ControlNet's scale (default 1; one value applies to all)")
    p.add_argument("--control-start", type=float, default=0.0, help="share of the steps before the ControlNets act")
    p.add_argument("--control-end", type=float, default=1.0, help="share of the steps after which they stop")
    p.add_argument("--guess-mode", action="store_true", help="ControlNets on the conditional pass only, their "
                   "residuals ramped from 0.1 to 1 (diffusers' guess mode)")  # fmt: skip
    p.add_argument("--canny", action="store_true", help="make each --control-image a Canny edge map first "
                   "(OpenCV: pip install 'diffrt[control]')")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="image k gets seed + k (default 0)")
    p.add_argument("-n", "--num-images", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call; memory grows with it, "
                   "not with -n (default 8)")  # fmt: skip
    p.add_argument("--height", type=int, default=None, help="default: the model's (or the --image's)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--image", default=None, help="input picture for image-to-image / inpainting (resized to the "
                   "output size when it differs)")  # fmt: skip
    p.add_argument("--strength", type=float, default=None, help="default 0.8 (image-to-image), 1 (inpainting)")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    p.add_argument("-o", "--out", default="out.png", help=OUT_HELP)
    p.set_defaults(run=_generate)


def _generate(args) -> int:
    import time

    from ..core.backend_spec import parse as parse_backend
    from ..core.startup import fast_start

    with fast_start():  # this process keeps its pipeline: see diffrt.core.startup
        from .. import load
        from ..core import images
        from ..models import lora
        from ..pipeline import outputs

        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        output = outputs.plan(args.out, args.num_images)  # before loading anything: a bad -o fails now
        pictures = {key: images.read_picture(path, f"--{key}") for key, path in (("image", args.image),
                    ("mask", args.mask)) if path}  # fmt: skip
        loras = [lora.parse_spec(spec) for spec in args.lora]
        control_images = _control_images(args)
        backend, backend_options = parse_backend(args.backend)
        pipe = load(args.model, device=args.device, dtype=args.dtype, backend=backend, loras=loras,
                    controlnet=args.controlnet or None, **backend_options)  # fmt: skip
        for path in args.embedding:
            tokens = pipe.load_textual_inversion(path)
            print(f"textual inversion {path}: tokens {', '.join(tokens)}", file=sys.stderr)
    batches = pipe.generate_batches(
        args.prompt, args.negative, batch_size=args.batch_size, steps=args.steps, sampler=args.sampler,
        guidance=args.guidance, seed=args.seed, num_images=args.num_images, height=args.height, width=args.width,
        image=pictures.get("image"), mask_image=pictures.get("mask"), strength=args.strength,
        true_cfg=args.true_cfg, max_sequence_length=args.max_sequence_length, cache=args.cache,
        **_control_options(args, control_images),
    )  # fmt: skip
    kept, seeds, start = [], [], time.perf_counter()
    shown_at = start
    for result in batches:
        for image, seed in zip(result.images, result.seeds, strict=True):
            if output.grid:
                kept.append(image)
            else:
                outputs.write(image, output.path(len(seeds), seed))
            seeds.append(seed)
        now = time.perf_counter()
        if args.num_images > args.batch_size and (now - shown_at >= PROGRESS_EVERY_S or len(seeds) == args.num_images):
            shown_at = now
            print(f"{len(seeds)}/{args.num_images} images ({now - start:.0f} s)", file=sys.stderr)
    if output.grid:
        outputs.write(outputs.image_grid(kept), output.pattern)
    given = {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance}
    print(pipe.defaults.describe(given, shown={"sampler": result.sampler}))
    print(result.stages.summary() + ("  (the last batch)" if args.num_images > args.batch_size else ""))
    shown = seeds if len(seeds) <= 8 else f"{seeds[0]}..{seeds[-1]}"
    print(f"wrote {output.describe(len(seeds))}, seeds {shown}")
    return 0


def _control_images(args) -> list:
    """The --control-image pictures (edge maps made now with --canny), read before the model loads."""
    from ..core import images
    from ..models import control

    if args.control_image and not args.controlnet:
        raise ValueError("--control-image needs a --controlnet")
    if args.canny and not args.control_image:
        raise ValueError("--canny makes an edge map of each --control-image: give one")
    pictures = [images.read_picture(path, "--control-image") for path in args.control_image]
    return [control.canny(p) for p in pictures] if args.canny else pictures


def _control_options(args, pictures: list) -> dict:
    """The pipeline's control arguments (none without --controlnet: the pipeline says what is missing)."""
    if not args.controlnet:
        return {}
    one = len(args.controlnet) == 1
    scales = args.control_scale[0] if len(args.control_scale) == 1 else args.control_scale or 1.0
    image = (pictures[0] if one and len(pictures) == 1 else pictures) or None
    return dict(control_image=image, controlnet_scale=scales, control_start=args.control_start,
                control_end=args.control_end, guess_mode=args.guess_mode)


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an HTTP image endpoint on Ray Serve (dynamic batching, replicas)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"as for generate (default: {DEFAULT_MODEL})")
    p.add_argument("--backend", default="torch", help=BACKEND_HELP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the cluster has GPUs)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA merged at load; requests set its scale by name with \"lora\": {name: scale}")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (one GPU each on a GPU cluster; else a "
                   "share of the CPUs each; default 1)")  # fmt: skip
    p.add_argument("--replica-cpus", type=float, default=None, help="CPUs (and torch threads) per CPU replica "
                   "(default: the cluster's CPUs / replicas, with one fewer torch thread left to Ray's proxy)")
    p.add_argument("--max-batch", type=int, default=8, help="most images in one pipeline call (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch waits for more requests "
                   "after the first (default 20)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests past this get 503 (default 64)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a request gets 504 and its work "
                   "stops at the next step (default 120)")  # fmt: skip
    p.add_argument("--max-prompt-chars", type=int, default=4000, help="longest prompt a request may send (default "
                   "4000)")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask for (default 150)")
    p.add_argument("--max-images", type=int, default=8, help="most images (n) in one request (default 8)")
    p.add_argument("--max-work", type=float, default=500.0, help="most images x steps x megapixels in one request "
                   "(default 500: 8 images of 1024x1024 at 50 steps are 419)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--address", default=None, help="an existing Ray cluster to join (auto, HOST:PORT or "
                   "ray://HOST:PORT); default: a local one for this command")  # fmt: skip
    p.add_argument("--name", default="diffrt", help="the Ray Serve application's name (default diffrt)")
    p.add_argument("--route-prefix", default="/", help="URL prefix of this application (default /)")
    p.set_defaults(run=_serve)


def _serve(args) -> int:
    from ..core.optional import require
    from ..models import lora

    require("ray", "fastapi", feature="diffrt serve")
    from ..serve import app, protocol, worker

    limits = protocol.Limits(args.max_prompt_chars, args.max_steps, args.max_images, args.max_work)
    settings = app.Settings(
        model=args.model, backend=args.backend, device=args.device, dtype=args.dtype,
        loras=tuple(lora.parse_spec(spec) for spec in args.lora), replicas=args.replicas, max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000, max_queue=args.max_queue, timeout_s=args.timeout,
        replica_cpus=args.replica_cpus, name=args.name, route_prefix=args.route_prefix, limits=limits,
    )  # fmt: skip
    settings.check()
    worker.preflight(settings, settings.loras, args.host, None if args.address else args.port)  # before Ray
    app.run(settings, host=args.host, port=args.port, address=args.address)
    return 0


def _add_batch(subparsers) -> None:
    p = subparsers.add_parser("batch", help="images for every row of a prompts file on Ray Data (resumable)")
    p.add_argument("prompts", help="a .txt file (a prompt per line) or .jsonl (objects with prompt and any of seed, "
                   "steps, sampler, guidance, negative_prompt, width, height)")  # fmt: skip
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"as for generate (default: {DEFAULT_MODEL})")
    p.add_argument("--backend", default="torch", help=BACKEND_HELP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the cluster has GPUs)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", required=True, help="folder of the PNGs and manifest.jsonl; a rerun skips finished rows")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each with a loaded pipeline (default 1)")
    p.add_argument("--worker-cpus", type=float, default=None, help="CPUs (and torch threads) per CPU worker "
                   "(default: the cluster's CPUs / workers, with one fewer torch thread left to Ray)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    p.add_argument("--seed", type=int, default=0, help="the k-th row without a seed gets seed + k (default 0)")
    p.add_argument("--address", default=None, help="an existing Ray cluster to join (default: a local one)")
    p.add_argument("--result", default=None, help="also write the counts and times as a JSON result (stamped with "
                   "the device and versions, like the bench commands)")  # fmt: skip
    p.set_defaults(run=_batch, out_kind=FOLDER)


def _batch(args) -> int:
    from ..core.optional import require

    require("ray", "pyarrow", feature="diffrt batch")
    from ..serve import batch, worker

    settings = batch.BatchSettings(model=args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                                   workers=args.workers, batch_size=args.batch_size, worker_cpus=args.worker_cpus)
    settings.check()
    worker.preflight(settings)  # before Ray starts
    summary = batch.run(args.prompts, args.out, settings, seed=args.seed, address=args.address)
    print(batch.describe(summary, args.out))
    if args.result:
        from dataclasses import asdict

        from ..core.results import write_result

        record = {**asdict(settings), "prompts": args.prompts, "seed": args.seed, "address": args.address}
        print(f"wrote {write_result(args.result, 'batch', record, {**summary, 'failed': len(summary['failed'])})}")
    return 2 if summary["failed"] else 0


def _samplers(args) -> int:
    from .. import samplers

    for name in samplers.available():
        sampler = samplers.get(name)
        options = ", ".join(sampler.options()) or "-"
        flow = "flow" if sampler.suits_flow else "    "
        print(f"{name:16s} {flow}  {sampler.summary}  [options: {options}]")
    print(f"{defaults.SCHEDULER:16s} -     the model's own diffusers scheduler, reproduced exactly (a diffusers "
          "folder's default)")
    print("\nflow: a deterministic ODE solver, valid on flow-matching grids (SD3, FLUX.1, fashion-flow, fashion-dit)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrt", description="diffusion inference runtime and benchmarks")
    parser.add_argument("--version", action="version", version=f"diffrt {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    subparsers.add_parser("samplers", help="list the samplers and their options").set_defaults(run=_samplers)
    _add_bench(subparsers)
    _add_export(subparsers)
    _add_train(subparsers)
    _add_models(subparsers)
    _add_serve(subparsers)
    _add_batch(subparsers)
    return parser


class _Format(logging.Formatter):
    """diffrt's INFO lines (progress, "compiling ...") plain; warnings and errors with their level and source."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


class _Once(logging.Filter):
    """Each distinct warning once per command (a batched run repeats the same one per batch)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _setup_logging() -> None:
    """Warnings of every library, and diffrt's INFO lines, on stderr (once each). Where logging is already
    set up (an embedding program, pytest), its handlers stay as they are."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Format())
        handler.addFilter(_Once())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("diffrt").setLevel(logging.INFO)


def _check_out(args) -> None:
    kind = getattr(args, "out_kind", None)
    if kind and getattr(args, "out", None):
        from ..core.files import check_output

        check_output(args.out, "--out" if kind != NEW_FOLDER else "output folder", folder=kind != FILE,
                     new=kind == NEW_FOLDER)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        _check_out(args)
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as err:  # ImportError: diffrt.core.optional.MissingPackage
        print(f"diffrt: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the OS refused a read or write the checks could not foresee (disk full, ...)
        from ..core.files import describe_os_error

        print(f"diffrt: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``diffrt`` console script: ``main``, then the process ends without tearing the interpreter down.

    Freeing torch's and ONNX Runtime's module state at exit takes about 0.9 s on 2 cores, a quarter of a
    deployed model's cold start; every file diffrt writes is closed and renamed in place by then, so nothing
    is lost by skipping it. Logging and the standard streams are flushed first."""
    import os

    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

