"""Denoisers: model output -> estimate of the clean sample x0.

A denoiser is any callable ``denoiser(x, alpha, sigma, t) -> x0_estimate`` where ``x = alpha*x0 + sigma*noise``;
``alpha`` and ``sigma`` are 0-d float tensors on x's device, ``t`` the model timestep (a 0-d tensor) or None.
This module is the only place that knows prediction types. A *model function* is ``model_fn(x, t) -> output``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def x0_from_output(output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
    """Convert a model output of the given prediction type into an x0 estimate (in x's dtype)."""
    output = output.to(x.dtype)
    if prediction == "epsilon":  # output = noise
        return (x - sigma * output) / alpha
    if prediction == "v_prediction":  # output = alpha*noise - sigma*x0
        return (alpha * x - sigma * output) / (alpha**2 + sigma**2)
    if prediction == "sample":
        return output
    if prediction == "flow":  # output = d x / d t = noise - x0 on the path alpha = 1 - t, sigma = t
        return (x - sigma * output) / (alpha + sigma)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def prediction_denoiser(model_fn: ModelFn, prediction: str) -> Denoiser:
    """Wrap ``model_fn(x, t)`` that predicts noise, v, x0 or flow velocity into a denoiser."""
    _check_prediction(prediction)

    def denoise(x, alpha, sigma, t):
        return x0_from_output(model_fn(x, t), x, alpha, sigma, prediction)

    return denoise


def eps_denoiser(model_fn: ModelFn) -> Denoiser:
    return prediction_denoiser(model_fn, "epsilon")


def v_denoiser(model_fn: ModelFn) -> Denoiser:
    return prediction_denoiser(model_fn, "v_prediction")


def x0_denoiser(model_fn: ModelFn) -> Denoiser:
    return prediction_denoiser(model_fn, "sample")


def flow_denoiser(model_fn: ModelFn) -> Denoiser:
    return prediction_denoiser(model_fn, "flow")


def consistency_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM boundary-condition scalings (c_skip, c_out) at model timestep t: c_skip(0) = 1, c_out(0) = 0."""
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_denoiser(
    model_fn: ModelFn, prediction: str = "epsilon", sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> Denoiser:
    """A latent consistency model: ``c_skip(t) * x + c_out(t) * x0_estimate`` (Luo et al., LCM)."""
    _check_prediction(prediction)

    def denoise(x, alpha, sigma, t):
        if t is None:
            raise ValueError("a consistency denoiser needs the model timestep t, got None")
        x0 = x0_from_output(model_fn(x, t), x, alpha, sigma, prediction)
        c_skip, c_out = consistency_scalings(t.to(x.dtype), sigma_data, timestep_scaling)
        return c_skip * x + c_out * x0

    return denoise


Conditioning = torch.Tensor | Mapping[str, torch.Tensor]


def _cat(a: Conditioning, b: Conditioning) -> Conditioning:
    if isinstance(a, Mapping):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4): match the per-sample std of the conditional output."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


def guided_model(
    model: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    cond: Conditioning,
    uncond: Conditioning | None,
    scale: float,
    rescale: float = 0.0,
) -> ModelFn:
    """Classifier-free guidance over ``model(x, t, conditioning)`` as one batched call.

    ``uncond + scale * (cond - uncond)`` on the model output (as diffusers does, so guidance rescale acts on
    the same quantity). With ``uncond`` None or scale 1 the unconditional half is skipped.
    """
    if not scale >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
    if uncond is None or scale == 1:
        return lambda x, t: model(x, t, cond)
    both = _cat(uncond, cond)

    def guided(x, t):
        out_uncond, out_cond = model(torch.cat([x, x]), t, both).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(out, out_cond, rescale) if rescale > 0 else out

    return guided


def masked_denoiser(denoiser: Denoiser, mask: torch.Tensor, known: torch.Tensor) -> Denoiser:
    """Latent blending (inpainting with an ordinary model): where ``mask`` is 0 the x0 estimate is the known
    latents themselves, so every sampler keeps them; where it is 1 the model's estimate is used."""

    def denoise(x, alpha, sigma, t):
        return mask * denoiser(x, alpha, sigma, t) + (1 - mask) * known

    return denoise


def with_extra_channels(model_fn: ModelFn, extra: torch.Tensor) -> ModelFn:
    """A model that takes fixed extra input channels after the sample's (a 9-channel inpainting U-Net's mask
    and masked-image latents), expanded to the batch."""

    def model(x, t):
        return model_fn(torch.cat([x, extra.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1), t)

    return model
