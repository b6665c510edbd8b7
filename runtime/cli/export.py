"""``diffrt export MODEL --format onnx|tensorrt --precision ... --out DIR``: arguments and the command."""

from __future__ import annotations

import argparse

FORMATS = ("onnx", "tensorrt")
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _triple(text: str) -> tuple[int, int, int]:
    """MIN,OPT,MAX (or one number for all three)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (three integers), got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name or a local diffusers folder")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--precision", choices=list(_DTYPES), default=None,
                   help="default: fp32 for onnx, fp16 for tensorrt (bf16: tensorrt only)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder (one file per graph + manifest.json)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default=None,
                   help="default: the model family's (dynamo for FLUX.1, torchscript for the others)")
    p.add_argument("--device", default=None, help="default: cpu for onnx, cuda for tensorrt")
    p.add_argument("--graphs", nargs="+", default=None, help="only these graphs (default: all)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="export with this ControlNet (repeatable): its graph controlnet_K, and the U-Net taking the "
                        "residuals; load the folder with the same controlnet= and onnx_dir=/engine_dir=")  # fmt: skip
    for var, what in (("batch", "images per call"), ("height", "pixels"), ("width", "pixels"),
                      ("sequence", "prompt tokens")):  # fmt: skip
        p.add_argument(f"--{var}", type=_triple, default=None, help=f"MIN,OPT,MAX {what} (engine profile)")
    p.add_argument("--refit", action="store_true", help="tensorrt: build refittable engines")
    p.add_argument("--force", action="store_true", help="re-export graphs already in --out")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import load
    from ..export.specs import ShapeRanges

    precision = args.precision or ("fp16" if args.format == "tensorrt" else "fp32")
    if args.format == "onnx" and precision == "bf16":
        raise ValueError(
            "ONNX export precision must be fp32 or fp16 (bf16 is a TensorRT build flag: --format tensorrt)"
        )
    if args.format == "tensorrt":
        from ..export.tensorrt import import_tensorrt

        import_tensorrt()  # before loading anything: a missing install is the first thing to say
    else:
        from ..core.optional import require
        from ..export.onnx_export import OnnxSettings

        require("onnx", "onnxruntime", feature="diffrt export --format onnx (the graphs, their parity check)")
        OnnxSettings(precision, args.opset, args.exporter or "torchscript").resolved()  # bad settings: fail now
    device = args.device or ("cuda" if args.format == "tensorrt" else "cpu")
    # weights in the export's dtype: the model hash then matches a pipeline loaded that way
    pipe = load(args.model, device=device, dtype=_DTYPES[precision], controlnet=args.controlnet or None)
    given = {k: getattr(args, k) for k in ("batch", "height", "width", "sequence") if getattr(args, k)}
    ranges = ShapeRanges(**given)
    if args.format == "onnx":
        from ..export.onnx_export import export_onnx

        manifest = export_onnx(pipe, args.out, precision=precision, opset=args.opset, exporter=args.exporter,
                               graphs=args.graphs, ranges=ranges, force=args.force)  # fmt: skip
        print(f"{'graph':16s} {'MB':>8s} {'parity (rel)':>13s} {'export s':>9s}")
        for name, record in manifest["graphs"].items():
            size = sum(r["bytes"] for r in (record["onnx"], record.get("data")) if r) / 1e6
            print(f"{name:16s} {size:8.2f} {record['parity']['max_rel_error']:13.2e} {record['export_seconds']:9.2f}")
    else:
        from ..export.trt_build import build_engines

        manifest = build_engines(pipe, args.out, precision=precision, ranges=ranges, graphs=args.graphs,
                                 refit=args.refit, opset=args.opset)  # fmt: skip
        for name, record in manifest["graphs"].items():
            print(f"{name:16s} {record['engine']['bytes'] / 1e6:8.2f} MB  built in {record['build_seconds']:.1f} s")
    print(f"wrote {args.out}/manifest.json ({manifest['precision']}, model hash {manifest['model']['hash'][:16]})")
    return 0
