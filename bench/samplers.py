"""``diffrt bench samplers``: sampler quality against model calls, on an exact oracle or a trained model.

``--model gmm``: error against NFE on a Gaussian mixture with an exact denoiser (:mod:`diffrt.bench.oracle`).
A trained model (fashion, fashion-flow, fashion-lcm, fashion-dit or a folder): adherence and domain FID against steps
(:mod:`diffrt.bench.model_samplers`). This module parses and checks the arguments; it imports no torch, so
the command line's help starts fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .sampler_configs import VARIANTS, parse_list, select

ORACLES = ("gmm",)
DEFAULT_NFE = "1,2,3,4,5,6,8,10,15,20,50"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gmm",
                        help=f"oracle model ({', '.join(ORACLES)}) or a trained model (fashion, fashion-flow, "
                             "fashion-lcm, fashion-dit or a folder: adherence and domain FID against steps)")
    parser.add_argument("--steps", default=None, help="trained models: comma list of step counts "
                                                      "(default 1,2,4,8,20,50)")
    parser.add_argument("--guidance", type=float, default=None, help="trained models (default: the model's)")
    parser.add_argument("--device", default="cpu", help="trained models: cpu or cuda")
    parser.add_argument("--dim", type=int, default=64, choices=(2, 64), help="mixture dimension (default 64)")
    parser.add_argument("--samplers", default=None,
                        help="comma list of samplers (default: all); registry names or variants "
                             f"{', '.join(VARIANTS)}")
    parser.add_argument("--nfe", default=DEFAULT_NFE, help=f"comma list of model-call budgets (default {DEFAULT_NFE})")
    parser.add_argument("--out", default="samplers-gmm.json", help="JSON result file (default ./samplers-gmm.json)")
    parser.add_argument("--plot", default=None, help="PNG plot (default: next to --out, same name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256, help="starting noises for deterministic samplers")
    parser.add_argument("--samples", type=int, default=None,
                        help="gmm: samples per stochastic run (default 4096); trained models: images per cell "
                             "(default 500)")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.model in ORACLES:
        from . import oracle

        return oracle.run(args)
    from ..models.embedded import NAMES as embedded

    if args.model not in embedded and not Path(args.model).is_dir():
        raise ValueError(f"unknown model {args.model!r}; allowed: {', '.join(ORACLES)} (oracle), "
                         f"{', '.join(embedded)} or a diffusers folder")  # fmt: skip
    from . import model_samplers

    configs = select(args.samplers) if args.samplers else None
    return model_samplers.run(args, configs, parse_list(args.steps or model_samplers.DEFAULT_STEPS, "steps"))
