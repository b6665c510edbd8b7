"""A fixed smooth nonlinear toy model shared by the sampler tests (no learned weights)."""

import torch


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth nonlinear function of the state and the timestep, used as eps / v / x0 / velocity output."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    phase = torch.cos(t / 300.0)
    mixed = x.roll(1, dims=-1) - 0.5 * x.roll(1, dims=-2)
    return torch.tanh(0.7 * x + 0.3 * torch.sin(mixed) * phase) + 0.05 * phase * x
