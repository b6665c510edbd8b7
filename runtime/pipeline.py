"""The text-to-image pipeline: encode prompts, run a sampler over the U-Net, decode latents.

It talks to the model only through a backend (:mod:`diffrt.backends`) and samples only through
:mod:`diffrt.samplers`, so every backend runs every sampler.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from . import denoisers, samplers
from .schedules import Grid, VPSchedule, flow_grid, vp_grid
from .text import tokenize

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SPACINGS = ("trailing", "leading", "linspace")
VAE_PRECISIONS = ("auto", "fp32", "model")
_STEP_SEED_OFFSET = 0x9E3779B97F4A7C15  # step-noise generators are seeded apart from the initial-noise ones


@dataclass
class StageTimes:
    """Wall times (ms) of the last call's stages: the numbers ``diffrt generate`` prints."""

    text_encode_ms: float = 0.0
    unet_calls_ms: list[float] = field(default_factory=list)  # one per U-Net call; empty for a CUDA graph
    denoise_ms: float = 0.0  # the whole sampling loop, U-Net calls and sampler updates
    vae_encode_ms: float = 0.0
    vae_decode_ms: float = 0.0
    total_ms: float = 0.0

    def summary(self) -> str:
        steps = ", ".join(f"{t:.1f}" for t in self.unet_calls_ms) if self.unet_calls_ms else "one CUDA graph"
        lines = [f"text encoding   {self.text_encode_ms:9.1f} ms"]
        if self.vae_encode_ms:
            lines.append(f"vae encode      {self.vae_encode_ms:9.1f} ms")
        lines += [
            f"denoising       {self.denoise_ms:9.1f} ms  ({len(self.unet_calls_ms)} U-Net calls: {steps})",
            f"vae decode      {self.vae_decode_ms:9.1f} ms",
            f"total           {self.total_ms:9.1f} ms",
        ]
        return "\n".join(lines)


class _Clock:
    """Timestamps without host syncs: CUDA events on CUDA (read once at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1000.0


@dataclass
class _Request:
    """One validated call."""

    prompts: list[str]
    negatives: list[str] | None
    seeds: list[int]
    steps: int
    sampler: str
    sampler_options: dict
    guidance: float
    guidance_rescale: float
    height: int
    width: int
    output_type: str
    image: torch.Tensor | None  # [N, 3, H, W] in [-1, 1]
    strength: float
    mask: torch.Tensor | None  # [N, 1, H, W], 1 = repaint
    spacing: str
    scheduler: object
    progress: bool
    overlay: bool


class Pipeline:
    """Text-to-image (and image-to-image, inpainting) over a backend.

    Thread safety: one pipeline object may be shared by several threads; calls are serialized by a lock
    (they run one after another), because the backend's modules and buffers are shared.
    """

    def __init__(self, components, backend, device: torch.device, dtype: torch.dtype, vae_precision="auto"):
        if vae_precision not in VAE_PRECISIONS:
            raise ValueError(f"vae_precision must be one of {VAE_PRECISIONS}, got {vae_precision!r}")
        self.components = components
        self.backend = backend
        self.device, self.dtype = device, dtype
        self.vae_precision = vae_precision
        if vae_precision == "fp32" and dtype != torch.float32:
            backend.upcast_vae()
        self.stages = StageTimes()
        self.last_seeds: list[int] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ info
    @property
    def vae_scale_factor(self) -> int:
        return self.components.vae_scale_factor

    @property
    def min_size(self) -> int:
        """Smallest height/width: the U-Net halves the latent once per down block but the last."""
        return self.vae_scale_factor * 2 ** (len(self.components.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.components.unet.config.sample_size * self.vae_scale_factor

    def __repr__(self):
        weights = ", RANDOM weights" if self.components.random_weights else ""
        return (
            f"Pipeline({self.components.name!r}, family={self.components.family}, backend={self.backend.name}, "
            f"device={self.device}, dtype={self.dtype}{weights})"
        )

    # ------------------------------------------------------------------------------------ call
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        guidance_rescale: float = 0.0,
        seed: int | list[int] | None = None,
        num_images: int | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        image=None,
        strength: float | None = None,
        mask_image=None,
        overlay: bool = True,
        spacing: str = "trailing",
        scheduler=None,
        progress: bool | None = None,
        **sampler_options,
    ):
        """Generate images; returns a list of PIL images (or np / pt arrays in [0, 1], or latents).

        ``seed`` k-th image: with an int seed s, image k uses seed s + k, so it is reproducible on its own.
        ``guidance`` 0 or 1 runs the conditional U-Net pass only. ``spacing`` places the timesteps
        (trailing starts at the last training timestep, which few-step sampling needs). ``scheduler``: a
        configured diffusers scheduler to reproduce exactly instead of ``sampler``/``spacing``.
        ``strength`` (default 0.8 for image-to-image, 1 for inpainting) 1 ignores the image's content
        (text-to-image from the same seed; with a mask, only the masked region is generated). ``mask_image``:
        white (1) = repaint, black (0) = keep; with ``overlay`` (default) the kept pixels are the input's own
        (the decoder would otherwise alter them slightly: its receptive field spans the whole image).
        """
        request = self._validate(
            prompt, negative_prompt, steps, sampler, guidance, guidance_rescale, seed, num_images, height, width,
            output_type, image, strength, mask_image, overlay, spacing, scheduler, progress, sampler_options,
        )  # fmt: skip
        with self._lock:
            return self._generate(request)

    # ------------------------------------------------------------------------------ validation
    def _validate(
        self, prompt, negative_prompt, steps, sampler, guidance, guidance_rescale, seed, num_images, height, width,
        output_type, image, strength, mask_image, overlay, spacing, scheduler, progress, sampler_options,
    ) -> _Request:  # fmt: skip
        defaults = self.components.defaults
        prompts = _prompt_list(prompt, num_images, "prompt")
        n = len(prompts)
        negatives = None if negative_prompt is None else _prompt_list(negative_prompt, n, "negative_prompt")
        steps = defaults.get("steps", 20) if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if scheduler is not None and sampler is not None:
            raise ValueError("give either sampler= or scheduler= (a diffusers scheduler to reproduce), not both")
        sampler = defaults.get("sampler", "dpmpp_2m") if sampler is None else sampler
        if scheduler is None and sampler not in samplers.available():
            raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(samplers.available())}")
        guidance = defaults.get("guidance", 7.5) if guidance is None else guidance
        if not isinstance(guidance, int | float) or not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
        if not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        seeds = _seed_list(seed, n)

        image_tensor = None if image is None else _image_tensor(image, n, "image")
        if image_tensor is not None:
            height = height or image_tensor.shape[-2]
            width = width or image_tensor.shape[-1]
            if tuple(image_tensor.shape[-2:]) != (height, width):
                raise ValueError(
                    f"image is {image_tensor.shape[-1]}x{image_tensor.shape[-2]} (WxH) but height/width ask for "
                    f"{width}x{height}"
                )
            if strength is None:
                strength = 1.0 if mask_image is not None else 0.8
            if not (isinstance(strength, int | float) and 0 < strength <= 1):
                raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        height = height or self.default_size
        width = width or self.default_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value % self.vae_scale_factor or value < self.min_size:
                raise ValueError(
                    f"{name} must be a multiple of {self.vae_scale_factor} and at least {self.min_size}, got {value!r}"
                )
        mask = None
        if mask_image is not None:
            if image_tensor is None:
                raise ValueError("mask_image needs image= (the picture to inpaint)")
            mask = _mask_tensor(mask_image, n)
            if tuple(mask.shape[-2:]) != tuple(image_tensor.shape[-2:]):
                raise ValueError(
                    f"mask_image is {mask.shape[-1]}x{mask.shape[-2]} but image is "
                    f"{image_tensor.shape[-1]}x{image_tensor.shape[-2]}; they must match"
                )
        elif self.components.inpainting_unet:
            raise ValueError("this is an inpainting U-Net (9 input channels): give image= and mask_image=")
        if scheduler is None:
            # Options are checked now, before any heavy work (the grid is not needed to check names).
            probe = vp_grid(VPSchedule.scaled_linear(), steps)
            samplers.prepare(sampler, probe, "cpu", torch.float32, **sampler_options)
        elif sampler_options:
            raise ValueError(f"sampler options {sorted(sampler_options)} cannot be combined with scheduler=")
        if progress is None:
            progress = sys.stderr.isatty()
        return _Request(
            prompts, negatives, seeds, steps, sampler, sampler_options, float(guidance), float(guidance_rescale),
            height, width, output_type, image_tensor, float(strength or 1.0), mask, spacing, scheduler, progress,
            bool(overlay),
        )  # fmt: skip

    # ------------------------------------------------------------------------------ generation
    def _generate(self, req: _Request):
        clock = _Clock(self.device)
        times = StageTimes()
        t_start = clock.mark()

        cond, uncond = self._encode(req)
        t_encoded = clock.mark()

        name, grid, options = self._sampling_plan(req)
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]
        latent_shape = (self.components.latent_channels, req.height // self.vae_scale_factor,
                        req.width // self.vae_scale_factor)  # fmt: skip
        noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(self.device)

        image_latents, marks = None, []
        t_vae_in = clock.mark()
        if req.image is not None:
            image_latents = self._encode_image(req.image)
        t_vae_out = clock.mark()
        grid, x = self._start(grid, noise, image_latents, req)

        repaint = None if req.mask is None else self._latent_mask(req.mask)
        plan = samplers.prepare(name, grid, self.device, torch.float32, **options)
        x = x.to(torch.float32)
        graphs = getattr(self.backend, "loop_graphs", None)
        if graphs is not None and not samplers.get(name).stochastic:
            x = self._denoise_captured(graphs, plan, x, cond, uncond, req, repaint, image_latents)
        else:
            x = self._denoise_eager(plan, x, cond, uncond, req, repaint, image_latents, clock, marks)
        t_denoised = clock.mark()

        result = x if req.output_type == "latent" else self._decode(x)
        if req.mask is not None and req.overlay and req.output_type != "latent":
            # paste the untouched pixels back: the VAE decoder's receptive field is global
            mask = req.mask.to(result.device)
            result = mask * result + (1 - mask) * (req.image.to(result.device) / 2 + 0.5)
        t_end = clock.mark()

        times.text_encode_ms = clock.ms(t_start, t_encoded)
        times.vae_encode_ms = clock.ms(t_vae_in, t_vae_out) if req.image is not None else 0.0
        times.unet_calls_ms = [clock.ms(a, b) for a, b in zip(marks[::2], marks[1::2], strict=True)]
        times.denoise_ms = clock.ms(t_vae_out, t_denoised)
        times.vae_decode_ms = clock.ms(t_denoised, t_end) if req.output_type != "latent" else 0.0
        times.total_ms = clock.ms(t_start, t_end)
        self.stages, self.last_seeds = times, list(req.seeds)
        return _convert(result, req.output_type)

    def _make_denoiser(self, cond, uncond, req: _Request, repaint, image_latents):
        model = self._guided_model(cond, uncond, req)
        if repaint is not None and self.components.inpainting_unet:
            model = self._inpainting_model(model, req, repaint)
            repaint = None  # the inpainting U-Net sees the mask itself; no blending
        return self._denoiser(model, repaint, image_latents), repaint

    def _denoise_eager(self, plan, x, cond, uncond, req: _Request, repaint, image_latents, clock, marks):
        """Run the loop step by step, timing each U-Net call (events on CUDA: no syncs) with a progress bar."""
        from tqdm.auto import tqdm

        denoiser, blend = self._make_denoiser(cond, uncond, req, repaint, image_latents)
        step_generators = [
            torch.Generator(self.device).manual_seed((s + _STEP_SEED_OFFSET) % 2**63) for s in req.seeds
        ]
        calls = plan.levels.steps + sum(plan.static.get("second", []))
        with tqdm(total=calls, desc="denoising", disable=not req.progress, leave=False) as bar:

            def timed(x, alpha, sigma, t):
                marks.append(clock.mark())
                out = denoiser(x, alpha, sigma, t)
                marks.append(clock.mark())
                bar.update(1)
                return out

            x = samplers.run(plan, timed, x, step_generators)
        return x if blend is None else blend * x + (1 - blend) * image_latents

    def _denoise_captured(self, graphs, plan, x, cond, uncond, req: _Request, repaint, image_latents):
        """The whole loop as one CUDA graph per setting (no per-step timings: the steps run as one launch)."""
        inputs = {"x": x, **{"cond." + k: v for k, v in cond.items()}}
        if uncond is not None:
            inputs.update({"uncond." + k: v for k, v in uncond.items()})
        if repaint is not None:
            inputs.update(repaint=repaint, image_latents=image_latents)

        def loop(**buffers):
            def part(prefix):
                return {k[len(prefix) :]: v for k, v in buffers.items() if k.startswith(prefix)} or None

            denoiser, blend = self._make_denoiser(
                part("cond."), part("uncond."), req, buffers.get("repaint"), buffers.get("image_latents")
            )
            out = samplers.run(plan, denoiser, buffers["x"])
            return out if blend is None else blend * out + (1 - blend) * buffers["image_latents"]

        key = (
            plan.name, repr(sorted(req.sampler_options.items())), tuple(plan.levels.alphas.tolist()),
            tuple(plan.levels.timesteps.tolist()), req.guidance, req.guidance_rescale,
            tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())),
        )  # fmt: skip
        return graphs.run(key, loop, inputs)

    def _encode(self, req: _Request):
        """Conditioning for the prompts and, when guidance is on, the negative prompts."""
        cond = self._encode_prompts(req.prompts, req)
        if not _guidance_on(req.guidance) or self.components.unet.config.get("time_cond_proj_dim"):
            return cond, None
        if req.negatives is None and self.components.family == "sdxl":
            # SDXL was trained with zeroed embeddings for empty prompts (force_zeros_for_empty_prompt)
            return cond, {k: torch.zeros_like(v) if k != "time_ids" else v for k, v in cond.items()}
        return cond, self._encode_prompts(req.negatives or [""] * len(req.prompts), req)

    def _encode_prompts(self, prompts: list[str], req: _Request) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for index, tokenizer in enumerate(self.components.tokenizers):
            graph = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
            out = self.backend.run(graph, input_ids=tokenize(tokenizer, prompts).to(self.device))
            hidden.append(out["hidden"])
            pooled = out.get("pooled", pooled)
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
        if self.components.family == "sdxl":
            # size/crop conditioning: original size, crop top-left, target size
            size = torch.tensor([req.height, req.width, 0, 0, req.height, req.width], device=self.device)
            cond["text_embeds"] = pooled
            cond["time_ids"] = size.to(pooled.dtype).expand(len(prompts), 6)
        return cond

    def _sampling_plan(self, req: _Request) -> tuple[str, Grid, dict]:
        scheduler = self.components.scheduler
        if req.scheduler is not None:
            return samplers.from_diffusers(req.scheduler, req.steps)
        if self.components.is_flow:
            return req.sampler, flow_grid(req.steps, shift=scheduler.config.get("shift", 1.0)), req.sampler_options
        if self.components.is_consistency:
            # consistency models are distilled on the LCM scheduler's own timesteps
            _, grid, _ = samplers.from_diffusers(scheduler, req.steps)
            return req.sampler, grid, req.sampler_options
        schedule = VPSchedule(scheduler.alphas_cumprod)
        offset = scheduler.config.get("steps_offset", 0) if req.spacing == "leading" else 0
        return req.sampler, vp_grid(schedule, req.steps, spacing=req.spacing, steps_offset=offset), req.sampler_options

    def _start(self, grid: Grid, noise: torch.Tensor, image_latents, req: _Request):
        """The starting state: scaled noise, or for image-to-image the image noised to the start level."""
        if image_latents is None or req.strength >= 1.0:
            return grid, noise * grid.init_scale
        # as diffusers: skip the first (1 - strength) share of the steps
        first = grid.steps - min(int(grid.steps * req.strength), grid.steps)
        if first >= grid.steps:
            raise ValueError(f"strength {req.strength} with {grid.steps} steps leaves no step to run; raise either")
        grid = Grid(grid.alphas[first:], grid.sigmas[first:], grid.timesteps[first:], grid.init_scale, grid.kind)
        alpha, sigma = float(grid.alphas[0]), float(grid.sigmas[0])
        return grid, alpha * image_latents + sigma * noise

    def _guided_model(self, cond, uncond, req: _Request):
        def unet(x, t, conditioning):
            inputs = dict(conditioning)
            inputs["timestep"] = t.to(torch.float32).expand(x.shape[0])
            return self.backend.run("unet", sample=x.to(self.dtype), **inputs)["out"]

        embed_dim = self.components.unet.config.get("time_cond_proj_dim")
        if embed_dim:  # guidance-distilled (LCM) U-Nets take the scale as an embedding: one pass, no CFG
            w = guidance_embedding(req.guidance, embed_dim, cond["encoder_hidden_states"])
            cond = {**cond, "timestep_cond": w.expand(cond["encoder_hidden_states"].shape[0], -1)}
            return lambda x, t: unet(x, t, cond)
        if not _guidance_on(req.guidance):
            uncond = None
        return denoisers.guided_model(unet, cond, uncond, req.guidance, req.guidance_rescale)

    def _inpainting_model(self, model, req: _Request, repaint: torch.Tensor):
        """A 9-channel inpainting U-Net takes [latents, mask, latents of the image with the hole blanked]."""
        masked = self._encode_image(req.image * (req.mask < 0.5).to(req.image.device))
        extra = torch.cat([repaint, masked], dim=1)
        return lambda x, t: model(torch.cat([x, extra.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1), t)

    def _denoiser(self, model, repaint=None, image_latents=None):
        """The model as a denoiser; with ``repaint`` (latent blending for ordinary U-Nets) the x0 estimate
        outside the repainted region is the image itself, so every sampler keeps those latents."""
        components = self.components
        if components.is_consistency:
            scaling = components.scheduler.config.get("timestep_scaling", 10.0)
            base = denoisers.consistency_denoiser(model, components.prediction_type, timestep_scaling=scaling)
        else:
            base = denoisers.prediction_denoiser(model, components.prediction_type)
        if repaint is None:
            return base
        return lambda x, alpha, sigma, t: repaint * base(x, alpha, sigma, t) + (1 - repaint) * image_latents

    def _latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        h, w = mask.shape[-2] // self.vae_scale_factor, mask.shape[-1] // self.vae_scale_factor
        return torch.nn.functional.interpolate(mask, size=(h, w), mode="nearest").to(self.device)

    def _encode_image(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae.config
        latent = self.backend.run("vae_encoder", image=image.to(self.device))["latent"].to(torch.float32)
        return (latent - (vae.get("shift_factor") or 0.0)) * vae.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae.config
        z = latents / vae.scaling_factor + (vae.get("shift_factor") or 0.0)
        image = self.backend.run("vae_decoder", latent=z)["image"]
        if self.vae_precision == "auto" and not torch.isfinite(image).all():
            log.warning("the %s VAE overflowed (non-finite pixels); decoding in float32 from now on", image.dtype)
            self.backend.upcast_vae()
            image = self.backend.run("vae_decoder", latent=z)["image"]
        return (image.to(torch.float32) / 2 + 0.5).clamp(0, 1)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device) -> torch.device:
    """CUDA when a GPU is present unless told otherwise; a clear error for anything but cpu/cuda."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but this machine has no CUDA GPU (use device 'cpu')")
    return device


def resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """Defaults and checks: CUDA and float16 when a GPU is present, else CPU and float32."""
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bfloat16 is not supported on {torch.cuda.get_device_name(device)}; use float16")
    return device, dtype


def load_pipeline(source, *, device=None, dtype=None, backend="torch", vae_precision="auto", **backend_options):
    """See :func:`diffrt.load`."""
    from . import backends
    from .loading import load_components

    device, dtype = resolve_device_dtype(device, dtype)
    if backend not in backends.names():
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(backends.names())}")
    reason = backends.availability()[backend]
    if reason is not None:  # before any heavy loading
        raise ValueError(f"backend {backend!r} cannot run here: {reason}")
    if vae_precision not in VAE_PRECISIONS:
        raise ValueError(f"vae_precision must be one of {VAE_PRECISIONS}, got {vae_precision!r}")
    components = load_components(source, dtype=dtype)
    runner = backends.create(backend, components, device, dtype, **backend_options)
    return Pipeline(components, runner, device, dtype, vae_precision=vae_precision)


def guidance_embedding(guidance: float, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of (guidance - 1) * 1000, as guidance-distilled LCM U-Nets were trained with."""
    w = (guidance - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = torch.cat([torch.sin(w * freqs), torch.cos(w * freqs)])
    emb = torch.nn.functional.pad(emb, (0, dim % 2))
    return emb[None].to(device=like.device, dtype=like.dtype)


def _guidance_on(guidance: float) -> bool:
    return guidance not in (0.0, 1.0)


def _prompt_list(prompt, num_images, what) -> list[str]:
    if num_images is not None and (not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1):
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if isinstance(prompt, str):
        prompts = [prompt] * (1 if num_images is None else num_images)
    elif isinstance(prompt, list | tuple) and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
        if num_images is not None and len(prompts) != num_images:
            raise ValueError(f"{what} has {len(prompts)} entries but {num_images} images were asked for")
    else:
        raise ValueError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{what} list is empty")
    return prompts


def _seed_list(seed, n: int) -> list[int]:
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + k for k in range(n)]
    if isinstance(seed, list | tuple) and all(isinstance(s, int) for s in seed):
        if len(seed) != n:
            raise ValueError(f"seed list has {len(seed)} entries but {n} images were asked for")
        return list(seed)
    raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")


def _to_tensor(picture, what: str) -> torch.Tensor:
    """PIL image / array / tensor -> float tensor [N, C, H, W] in [0, 1]."""
    import numpy as np

    if hasattr(picture, "convert") and hasattr(picture, "size"):  # PIL
        mode = "L" if what == "mask_image" else "RGB"
        array = np.asarray(picture.convert(mode), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array)
        tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
    elif isinstance(picture, torch.Tensor | np.ndarray):
        tensor = torch.as_tensor(picture, dtype=torch.float32)
        tensor = tensor[None] if tensor.ndim == 3 else tensor
        if what == "mask_image" and tensor.ndim == 2:
            tensor = tensor[None, None]
        if tensor.ndim != 4:
            raise ValueError(f"{what} tensor must be [C, H, W] or [N, C, H, W], got shape {tuple(tensor.shape)}")
    elif isinstance(picture, list | tuple) and picture:
        return torch.cat([_to_tensor(p, what) for p in picture])
    else:
        raise ValueError(f"{what} must be a PIL image, a tensor or an array, got {type(picture).__name__}")
    return tensor


def _image_tensor(image, n: int, what: str) -> torch.Tensor:
    tensor = _to_tensor(image, what)
    if tensor.shape[1] != 3:
        raise ValueError(f"{what} must have 3 channels (RGB), got {tensor.shape[1]}")
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{what} values must be in [0, 1]")
    return _repeat(tensor, n, what) * 2 - 1


def _mask_tensor(mask, n: int) -> torch.Tensor:
    tensor = _to_tensor(mask, "mask_image")
    if tensor.shape[1] != 1:
        raise ValueError(f"mask_image must have 1 channel, got {tensor.shape[1]}")
    return (_repeat(tensor, n, "mask_image") > 0.5).to(torch.float32)


def _repeat(tensor: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if tensor.shape[0] == n:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(n, *tensor.shape[1:])
    raise ValueError(f"{what} has {tensor.shape[0]} pictures for {n} images")


def _convert(images: torch.Tensor, output_type: str):
    if output_type in ("latent", "pt"):
        return images.cpu()
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype("uint8")) for a in array]
