"""``diffrt bench samplers``: sampler error against model calls (NFE) on an exact oracle.

The model is a Gaussian mixture (:mod:`diffrt.bench.gmm`) whose denoiser is exact, so every error measured
here is the sampler's own. Deterministic samplers are scored by the RMS distance to a high-accuracy solution
of the probability-flow ODE from the same starting noise; stochastic ones by the
energy distance between their samples and fresh exact samples of the mixture. All runs use EDM's ``ve_grid``
(sigma 80 -> 0.002 -> 0, Karras rho 7) in float64.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..samplers import available, sample
from ..schedules import ve_grid
from .gmm import GaussianMixture, gmm_2d, gmm_64d
from .harness import write_result

MODELS = {"gmm": {2: gmm_2d, 64: gmm_64d}}
DEFAULT_NFE = "1,2,3,4,5,6,8,10,15,20,50"
# configurations beyond each registered sampler's defaults that are worth a line of their own
VARIANTS = {
    "ddim_eta1": ("ddim", {"eta": 1.0}),
    "unipc_bh1": ("unipc", {"variant": "bh1"}),
    "unipc_3": ("unipc", {"order": 3}),
    "dpmpp_3m_taylor": ("dpmpp_3m", {"third_order": "taylor"}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gmm",
                        help=f"oracle model ({', '.join(MODELS)}) or a trained model (fashion, fashion-flow, "
                             "fashion-lcm or a folder: adherence and domain FID against steps)")
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


# ------------------------------------------------------------------------------------------ plumbing


def configurations() -> dict[str, tuple[str, dict]]:
    """Every registered sampler with its default options, then the variants."""
    configs = {name: (name, {}) for name in available()}
    configs.update({label: spec for label, spec in VARIANTS.items() if spec[0] in configs})
    return configs


def _select(requested: str | None) -> dict[str, tuple[str, dict]]:
    configs = configurations()
    if requested is None:
        return configs
    labels = [s.strip() for s in requested.split(",") if s.strip()]
    unknown = [s for s in labels if s not in configs]
    if unknown or not labels:
        raise ValueError(f"unknown sampler(s) {unknown or requested!r}; allowed: {', '.join(configs)}")
    return {label: configs[label] for label in labels}


def _parse_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--{what} must be a comma list of integers >= 1, got {text!r}")
    return sorted(set(values))


def _parse_nfe(text: str) -> list[int]:
    return _parse_list(text, "nfe")


class CallCounter:
    """A denoiser wrapper counting model calls (one call = one NFE, whatever the batch)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, alpha, sigma, t):
        self.calls += 1
        return self.denoiser(x, alpha, sigma, t)


def _zero(x, alpha, sigma, t):
    return torch.zeros_like(x)


def steps_for_nfe(name: str, options: dict, max_nfe: int) -> dict[int, int]:
    """NFE -> smallest step count costing exactly that many calls, by counting (heun: 2n - 1)."""
    found: dict[int, int] = {}
    x = torch.zeros(1, 1, dtype=torch.float64)
    for n in range(1, 4 * max_nfe + 1):
        counter = CallCounter(_zero)
        sample(name, counter, x, ve_grid(n), **options)
        found.setdefault(counter.calls, n)
        if counter.calls > max_nfe:
            break
    return found


def is_stochastic(name: str, options: dict) -> bool:
    """Whether the configuration draws noise: two seeds on a 4-step grid give different results."""
    x = torch.ones(2, 2, dtype=torch.float64)

    def shrink(x, alpha, sigma, t):  # depends on x, so noise drawn before the last step shows in the output
        return 0.5 * x

    runs = [sample(name, shrink, x, ve_grid(4), generator=torch.Generator().manual_seed(s), **options) for s in (0, 1)]
    return not torch.equal(*runs)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Szekely's energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic: >= 0; zero iff same law).

    Chosen over sliced Wasserstein: its exact-vs-exact floor falls as 1/N (W2's as 1/sqrt(N)), so at a
    few thousand samples it tells sampler bias from sampling noise far better.
    """
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------- running


def _measure(label, name, options, mix: GaussianMixture, nfes, args, deterministic_case, gen):
    stochastic = is_stochastic(name, options)
    steps = steps_for_nfe(name, options, max(nfes))
    record = {"sampler": name, "options": options, "stochastic": stochastic,
              "metric": "energy_distance" if stochastic else "rms_error", "nfe": nfes, "steps": [], "error": []}
    for nfe in nfes:
        n = steps.get(nfe)
        error = None
        if n is not None:
            grid = ve_grid(n)
            counter = CallCounter(mix)
            if stochastic:
                # start from the exact marginal at sigma 80, so the distance measures the sampler alone
                x = mix.sample_level(args.samples, float(grid.alphas[0]), float(grid.sigmas[0]), generator=gen)
                out = sample(name, counter, x, grid, generator=gen, **options)
                error = energy_distance(out, mix.sample(args.samples, gen))
            else:
                x, reference = deterministic_case
                out = sample(name, counter, x, grid, **options)
                error = (out - reference).square().mean().sqrt().item()
            if counter.calls != nfe:
                raise RuntimeError(f"{label}: {n} steps made {counter.calls} model calls, expected {nfe}")
            error = _finite(error)
        record["steps"].append(n)
        record["error"].append(error)
    return label, record


def _reference(mix: GaussianMixture, batch: int, gen: torch.Generator):
    """Starting noises at sigma 80 and D(exact ODE solution at sigma_min): the last step, sigma_min -> 0, is
    the jump x = D(x) in every sampler, so this target leaves out only that shared exit error (~1e-5)."""
    grid = ve_grid(2)
    a0, s0, a1, s1 = (float(v) for v in (grid.alphas[0], grid.sigmas[0], grid.alphas[-2], grid.sigmas[-2]))
    x = grid.init_scale * torch.randn(batch, mix.dim, generator=gen, dtype=torch.float64)
    return x, mix(mix.ode_reference(x, a0, s0, a1, s1), a1, s1, None)


def _table(title: str, nfes, rows: dict) -> str:
    width = max([len(label) for label in rows] + [7])
    lines = [title, f"{'NFE':<{width}} " + " ".join(f"{n:>8d}" for n in nfes)]
    for label, record in rows.items():
        cells = [f"{e:8.2e}" if e is not None else f"{'-':>8}" for e in record["error"]]
        lines.append(f"{label:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def run(args) -> int:
    if args.model not in MODELS:
        from .. import embedded
        from . import model_samplers

        if args.model not in embedded.NAMES and not Path(args.model).is_dir():
            raise ValueError(f"unknown model {args.model!r}; allowed: {', '.join(MODELS)} (oracle), "
                             f"{', '.join(embedded.NAMES)} or a diffusers folder")  # fmt: skip

        configs = _select(args.samplers) if args.samplers else None
        return model_samplers.run(args, configs, _parse_list(args.steps or model_samplers.DEFAULT_STEPS, "steps"))
    if args.steps is not None or args.guidance is not None:
        raise ValueError("--steps and --guidance apply to trained models; the gmm oracle takes --nfe")
    args.samples = 4096 if args.samples is None else args.samples
    if args.dim not in MODELS[args.model]:
        raise ValueError(f"--dim must be one of {sorted(MODELS[args.model])}, got {args.dim}")
    if args.batch < 1 or args.samples < 2:
        raise ValueError("--batch must be >= 1 and --samples >= 2")
    configs = _select(args.samplers)
    nfes = _parse_nfe(args.nfe)
    mix = MODELS[args.model][args.dim](args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    case = _reference(mix, args.batch, gen)
    results = dict(_measure(label, name, options, mix, nfes, args, case, gen)
                   for label, (name, options) in configs.items())
    floor = energy_distance(mix.sample(args.samples, gen), mix.sample(args.samples, gen))

    det = {k: v for k, v in results.items() if not v["stochastic"]}
    sto = {k: v for k, v in results.items() if v["stochastic"]}
    where = f"{args.dim}-D Gaussian mixture, ve_grid (sigma 80 -> 0.002 -> 0), float64"
    if det:
        print(_table(f"deterministic: RMS error to the PF-ODE reference ({args.batch} starts; {where})", nfes, det))
    if sto:
        print()
        print(_table(f"stochastic: energy distance to exact samples ({args.samples} samples; floor exact-vs-exact "
                     f"{floor:.2e}; {where})", nfes, sto))
        if "lcm" in sto:
            print("note: lcm runs on the exact denoiser E[x0|x], not a consistency function: its bias does not "
                  "vanish with NFE")

    settings = {
        "model": args.model, "dim": args.dim, "seed": args.seed, "nfe": nfes, "batch": args.batch,
        "samples": args.samples, "dtype": "float64",
        "grid": "ve_grid(n, sigma_min=0.002, sigma_max=80, rho=7); n = steps giving the NFE",
        "reference": "exact denoiser applied to the DOP853 PF-ODE solution (rtol=atol=1e-12) at sigma_min",
        "stochastic_start": "exact marginal at sigma 80",
    }
    out = write_result(args.out, "samplers", settings, {"samplers": results, "energy_distance_floor": floor})
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    _plot(plot, nfes, det, sto, floor, where)
    print(f"\nwrote {out} and {plot}")
    return 0


MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P", "h")


def _plot(path: Path, nfes, det: dict, sto: dict, floor: float, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [(det, "deterministic: RMS error to PF-ODE reference"),
              (sto, "stochastic: energy distance to exact samples")]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (rows, title) in zip(axes[0], panels, strict=True):
        for i, (label, record) in enumerate(rows.items()):
            points = [(n, e) for n, e in zip(record["nfe"], record["error"], strict=True) if e is not None and e > 0]
            if points:  # markers and dashes differ too, so identical lines (euler = ddim) stay visible
                ax.plot(*zip(*points, strict=True), marker=MARKERS[i % len(MARKERS)], markersize=4,
                        linestyle=("-", "--", ":")[i % 3], label=label)
        if rows is sto:
            ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label="exact vs exact (floor)")
        ax.set(xscale="log", yscale="log", xlabel="model calls (NFE)", title=title)
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.suptitle(where, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
