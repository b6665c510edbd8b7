"""``diffrt train KIND --out DIR``: arguments and dispatch (the trainers live in their modules)."""

from __future__ import annotations

import argparse
import json

KINDS = ("vae", "fashion", "fashion-flow", "fashion-lcm", "fashion-dit", "fashion-lora", "fashion-controlnet",
         "classifier")
# options that only some kinds take (each kind's settings field of the same name)
KIND_OPTIONS = {
    "vae": ("fashion", "fashion-flow", "fashion-dit"),
    "init": ("fashion", "fashion-flow"),
    "high_t_share": ("fashion", "fashion-flow"),
    "beta_schedule": ("fashion",),
    "teacher": ("fashion-lcm",),
    "cond_init": ("fashion-lcm",),
    "label": ("fashion-lora",),
    "prompt": ("fashion-lora",),
    "rank": ("fashion-lora",),
}
ORDER = ("order: vae -> fashion, fashion-flow, fashion-dit (--vae) -> fashion-lcm (--teacher); fashion-lora and "
         "fashion-controlnet on the embedded fashion; classifier on its own")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = f"Train an embedded Fashion-MNIST model ({ORDER}). Defaults are the shipped models' settings."
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vae", default=None, help="VAE folder (fashion, fashion-flow, fashion-dit)")
    parser.add_argument("--teacher", default=None, help="`fashion` folder to distil (fashion-lcm)")
    parser.add_argument("--cond-init", default=None, choices=("zero", "random"),
                        help="fashion-lcm: initial guidance projection (zero: the student starts as the teacher)")
    parser.add_argument("--init", default=None,
                        help="start from a trained folder's U-Net (fashion: an eps or flow folder; fashion-flow)")
    parser.add_argument("--beta-schedule", default=None, help="fashion: VP betas, scaled_linear (default) or linear")
    parser.add_argument("--high-t-share", type=float, default=None,
                        help="fashion: share of timesteps drawn from [600, 1000) (oversampling high noise)")
    parser.add_argument("--label", type=int, default=None, help="fashion-lora: the class the prompt turns into "
                        "(0-9; default 3, dress)")  # fmt: skip
    parser.add_argument("--prompt", default=None, help="fashion-lora: the neutral caption it learns")
    parser.add_argument("--rank", type=int, default=None, help="fashion-lora: LoRA rank (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recorded setting)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--data-limit", type=int, default=None, help="use the first N training images (smoke runs)")
    parser.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--size", choices=("full", "tiny"), default=None, help="tiny: smoke-test model sizes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def settings_for(args):
    """The kind's settings dataclass with the given options applied; unknown-to-the-kind options refused."""
    from ..train import classifier, controlnet, diffusion, dit, lcm, lora, vae

    if args.kind == "vae":
        settings = vae.VAESettings()
    elif args.kind == "classifier":
        settings = classifier.ClassifierSettings()
    elif args.kind == "fashion-lcm":
        settings = lcm.LCMSettings()
    elif args.kind == "fashion-dit":
        settings = dit.DiTSettings()
    elif args.kind == "fashion-lora":
        settings = lora.LoraTrainSettings()
    elif args.kind == "fashion-controlnet":
        settings = controlnet.ControlNetTrainSettings()
    else:
        settings = diffusion.DiffusionSettings(objective="eps" if args.kind == "fashion" else "flow")
    if args.size is not None and args.kind in ("fashion-lcm", "fashion-lora", "fashion-controlnet"):
        raise ValueError(f"--size does not apply to {args.kind}: it keeps its base model's architecture")
    for option, kinds in KIND_OPTIONS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if args.kind not in kinds:
            raise ValueError(f"--{option.replace('_', '-')} applies to {' and '.join(kinds)}, not {args.kind}")
        setattr(settings, option, value)
    options = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": args.device,
        "data_limit": args.data_limit,
        "data_root": args.data_root,
        "size": args.size,
    }
    for key, value in options.items():
        if value is not None:
            setattr(settings, key, value)
    settings.check()
    return settings


def run(args) -> int:
    from ..train import classifier, controlnet, diffusion, dit, lcm, lora, vae

    settings = settings_for(args)
    trainer = {
        "vae": vae.train_vae,
        "classifier": classifier.train_classifier,
        "fashion-lcm": lcm.train_lcm,
        "fashion-dit": dit.train_dit,
        "fashion-lora": lora.train_lora,
        "fashion-controlnet": controlnet.train_controlnet,
        "fashion": diffusion.train_diffusion,
        "fashion-flow": diffusion.train_diffusion,
    }[args.kind]
    result = trainer(args.out, settings, progress=not args.no_progress)
    shown = {k: v for k, v in result.metrics.items() if k != "loss_curve"}
    print(json.dumps(shown, indent=2))
    print(f"wrote {result.folder}")
    return 0
