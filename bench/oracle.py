"""The sampler benchmark on an exact oracle: sampler error against model calls (NFE) on a Gaussian mixture.

The model is a Gaussian mixture (:mod:`diffrt.bench.gmm`) whose denoiser is exact, so every error measured
here is the sampler's own. Deterministic samplers are scored by the RMS distance to a high-accuracy solution
of the probability-flow ODE from the same starting noise; stochastic ones by the
energy distance between their samples and fresh exact samples of the mixture. All runs use EDM's ``ve_grid``
(sigma 80 -> 0.002 -> 0, Karras rho 7) in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.optional import require
from ..core.results import write_result
from ..core.schedules import ve_grid
from ..samplers import sample
from .gmm import GaussianMixture, gmm_2d, gmm_64d
from .sampler_configs import CallCounter, is_stochastic, parse_list, select, steps_for_nfe

MIXTURES = {2: gmm_2d, 64: gmm_64d}


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
    """The oracle sweep of ``diffrt bench samplers`` (its arguments: :mod:`diffrt.bench.samplers`)."""
    if args.steps is not None or args.guidance is not None:
        raise ValueError("--steps and --guidance apply to trained models; the gmm oracle takes --nfe")
    require("scipy", "matplotlib", feature="diffrt bench samplers on the gmm oracle (its ODE reference, its plot)")
    args.samples = 4096 if args.samples is None else args.samples
    if args.dim not in MIXTURES:
        raise ValueError(f"--dim must be one of {sorted(MIXTURES)}, got {args.dim}")
    if args.batch < 1 or args.samples < 2:
        raise ValueError("--batch must be >= 1 and --samples >= 2")
    configs = select(args.samplers)
    nfes = parse_list(args.nfe, "nfe")
    mix = MIXTURES[args.dim](args.seed)
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
