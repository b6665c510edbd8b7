"""Sampler configurations for the sampler benchmarks: every registered sampler, named variants, and the
model-call count (NFE) of a step count, found by counting calls rather than by a table."""

from __future__ import annotations

# configurations beyond each registered sampler's defaults that are worth a line of their own
VARIANTS = {
    "ddim_eta1": ("ddim", {"eta": 1.0}),
    "unipc_bh1": ("unipc", {"variant": "bh1"}),
    "unipc_3": ("unipc", {"order": 3}),
    "dpmpp_3m_taylor": ("dpmpp_3m", {"third_order": "taylor"}),
}


def configurations() -> dict[str, tuple[str, dict]]:
    """Every registered sampler with its default options, then the variants."""
    from ..samplers import available

    configs = {name: (name, {}) for name in available()}
    configs.update({label: spec for label, spec in VARIANTS.items() if spec[0] in configs})
    return configs


def select(requested: str | None) -> dict[str, tuple[str, dict]]:
    configs = configurations()
    if requested is None:
        return configs
    labels = [s.strip() for s in requested.split(",") if s.strip()]
    unknown = [s for s in labels if s not in configs]
    if unknown or not labels:
        raise ValueError(f"unknown sampler(s) {unknown or requested!r}; allowed: {', '.join(configs)}")
    return {label: configs[label] for label in labels}


def parse_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--{what} must be a comma list of integers >= 1, got {text!r}")
    return sorted(set(values))


class CallCounter:
    """A denoiser wrapper counting model calls (one call = one NFE, whatever the batch)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, alpha, sigma, t):
        self.calls += 1
        return self.denoiser(x, alpha, sigma, t)


def zero_denoiser(x, alpha, sigma, t):
    return x.new_zeros(x.shape)


def steps_for_nfe(name: str, options: dict, max_nfe: int) -> dict[int, int]:
    """NFE -> smallest step count costing exactly that many calls, by counting (heun: 2n - 1)."""
    found: dict[int, int] = {}
    for n in range(1, 4 * max_nfe + 1):
        calls = nfe_of(name, options, n)
        found.setdefault(calls, n)
        if calls > max_nfe:
            break
    return found


def is_stochastic(name: str, options: dict) -> bool:
    """Whether the configuration draws noise: two seeds on a 4-step grid give different results."""
    import torch

    from ..core.schedules import ve_grid
    from ..samplers import sample

    x = torch.ones(2, 2, dtype=torch.float64)

    def shrink(x, alpha, sigma, t):  # depends on x, so noise drawn before the last step shows in the output
        return 0.5 * x

    runs = [sample(name, shrink, x, ve_grid(4), generator=torch.Generator().manual_seed(s), **options) for s in (0, 1)]
    return not torch.equal(*runs)


def nfe_of(name: str, options: dict, steps: int) -> int:
    """Model calls a sampler makes for ``steps`` steps (heun: 2 per step but the last), by counting."""
    import torch

    from ..core.schedules import ve_grid
    from ..samplers import sample

    counter = CallCounter(zero_denoiser)
    sample(name, counter, torch.zeros(1, 1, dtype=torch.float64), ve_grid(steps), **options)
    return counter.calls
