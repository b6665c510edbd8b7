"""The pipeline: a call's stages read top to bottom in :meth:`Pipeline._run`: encode the prompts (and a
picture), prepare the loop (noise, the sampler's plan, the tensors it reads), denoise (eagerly, or as one
captured CUDA graph), decode.

It talks to the model only through a backend (:mod:`diffrt.backends`), asks the loaded model
(:mod:`diffrt.models.families`: the family bound to its components) how prompts become conditioning and how
latents are shaped, and samples only through :mod:`diffrt.samplers`, so every backend runs every sampler on
every family.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from .. import samplers
from ..core import defaults, denoisers, memory, step_cache
from ..core.images import convert, image_tensor, latent_mask, to_tensor
from ..core.schedules import Grid, VPSchedule, flow_grid, vp_grid
from ..models import control, families
from . import request
from .adapters import Adapters
from .loop import LoopInputs, LoopSettings, model_calls
from .request import Request
from .timing import Clock, ProgressLines, StageTimes

log = logging.getLogger(__name__)

VAE_PRECISIONS = ("auto", "fp32", "model")
_STEP_SEED_OFFSET = 0x9E3779B97F4A7C15  # step-noise generators are seeded apart from the initial-noise ones


class Cancelled(Exception):
    """A call stopped by its ``cancel`` callable (between denoising steps): no images."""


@dataclass(frozen=True)
class Result:
    """One call's output: the images (as ``output_type`` asked), their seeds and the call's stage times."""

    images: object
    seeds: list[int]
    stages: StageTimes
    sampler: str = ""  # the sampler that ran (for sampler="scheduler": the one reproducing the model's scheduler)


class Pipeline:
    """Text-to-image (and image-to-image, inpainting) over a backend.

    Thread safety: one pipeline object may be shared by several threads; calls are serialized by a lock
    (they run one after another), because the backend's modules and buffers are shared. Each call's stage
    times come back with its :class:`Result` (``generate``); ``stages`` and ``last_seeds`` are the last call's.
    """

    def __init__(self, components, backend, device: torch.device, dtype: torch.dtype, vae_precision="auto"):
        if vae_precision not in VAE_PRECISIONS:
            raise ValueError(f"vae_precision must be one of {VAE_PRECISIONS}, got {vae_precision!r}")
        self.components = components
        self.model = families.model(components)  # the family bound to its components
        self.backend = backend
        self.device, self.dtype = device, dtype
        self.vae_precision = vae_precision
        if vae_precision == "fp32" and dtype != torch.float32:
            backend.upcast_vae()
        self.adapters = Adapters(self.model, backend)
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
        return self.model.size_multiple()

    @property
    def default_size(self) -> int:
        return self.model.default_size()

    @property
    def defaults(self) -> defaults.Defaults:
        """The model's sampling defaults (steps, sampler, guidance, ...): what a call uses for what it leaves
        unset, with where each came from (``.sources``, ``.describe()``; see :mod:`diffrt.core.defaults`)."""
        return defaults.Defaults(self.components.defaults, self.components.default_sources)

    @property
    def rules(self) -> request.Rules:
        max_steps = None
        if self.components.is_consistency:
            max_steps = self.components.scheduler.config.get("original_inference_steps")
        model, components = self.model, self.components
        distilled = model.guidance_distilled() and not components.guidance_embedding_dim
        return request.Rules(components.defaults, model.size_step(), self.min_size, self.default_size,
                             components.inpainting_unet, max_steps, distilled, model.max_sequence_length(),
                             model.max_size(), len(components.controlnets), components.scheduler)  # fmt: skip

    def __repr__(self):
        weights = ", RANDOM weights" if self.components.random_weights else ""
        return (
            f"Pipeline({self.components.name!r}, family={self.components.family}, backend={self.backend.name}, "
            f"device={self.device}, dtype={self.dtype}{weights})"
        )

    # ------------------------------------------------------------------------------------ adapters
    @property
    def loras(self) -> dict[str, dict]:
        """The loaded LoRAs: ``{name: {path, scale, ranks, layers, parts, targets}}``."""
        return self.adapters.loras()

    def load_lora(self, path, name: str | None = None, scale: float = 1.0) -> str:
        """Merge the LoRA at ``path`` (a .safetensors file, or a folder holding pytorch_lora_weights.safetensors;
        diffusers/PEFT or kohya keys) into the weights at ``scale``; returns its name (default: the file's)."""
        with self._lock:
            return self.adapters.load_lora(path, name, scale)

    def set_loras(self, scales: dict[str, float]) -> None:
        """Set the scales of loaded LoRAs by name (0 disables one): only the touched weights are rewritten."""
        with self._lock:
            self.adapters.set_loras(scales)

    def unload_lora(self, name: str) -> None:
        """Remove a LoRA: the weights it touched go back to what the others (or the base model) make them."""
        with self._lock:
            self.adapters.unload_lora(name)

    def load_textual_inversion(self, path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (safetensors: ``emb_params``, SDXL ``clip_l``/``clip_g``, or
        diffusers' ``{token: vectors}``); returns its tokens (default token: the file's own, else its name)."""
        self.adapters.check_tokens()
        with self._lock:
            return self.adapters.load_textual_inversion(path, token)

    # ------------------------------------------------------------------------------------ calls
    def __call__(self, prompt, negative_prompt=None, **options):
        """Generate images: a list of PIL images (or np / pt arrays in [0, 1], or latents). The options
        (steps, sampler, guidance, seed, num_images, height, width, image, mask_image, ...) are those of
        :func:`diffrt.pipeline.request.build`; ``cancel`` as for :meth:`generate`."""
        cancel = options.pop("cancel", None)
        return self._run(self._checked(prompt, negative_prompt, options), cancel).images

    def generate(self, prompt, negative_prompt=None, *, cancel=None, **options) -> Result:
        """Like calling the pipeline, but returns a :class:`Result` with this call's own seeds and stage times.
        ``cancel``: a callable asked before each denoiser call (and between stages); when it returns True the
        call stops there with :class:`Cancelled` (a captured CUDA-graph loop is asked before it starts)."""
        return self._run(self._checked(prompt, negative_prompt, options), cancel)

    def check(self, prompt, negative_prompt=None, **options) -> None:
        """Every check ``generate`` makes before any work (the arguments, the step cache, the memory), and the
        prompts through the model's tokenizers, without running the call: a ValueError names the bad value and
        what is allowed. Servers check each request with it before it joins a batch."""
        req = self._checked(prompt, negative_prompt, options)
        self.model.tokenize([*req.prompts, *(req.negatives or ())], req.max_sequence_length)

    def generate_batches(self, prompt, negative_prompt=None, *, batch_size: int = 8, cancel=None, **options):
        """Yield one :class:`Result` per batch of at most ``batch_size`` images, in order: memory stays that of
        one batch whatever ``num_images`` is. Image k is the same as from ``generate`` (seed s + k)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        req = self._checked(prompt, negative_prompt, options, batch_size)
        n = len(req.prompts)
        for first in range(0, n, batch_size):
            yield self._run(request.batch(req, first, min(first + batch_size, n)), cancel)

    def estimate_memory(self, prompt="", negative_prompt=None, **options) -> memory.Estimate:
        """The activation memory a call with these options needs (see :mod:`diffrt.core.memory`), without
        running it."""
        req = request.build(self.rules, prompt, negative_prompt, **options)
        return memory.estimate(self.components, **self._memory_settings(req))

    # ------------------------------------------------------------------------------------ checks
    def _checked(self, prompt, negative_prompt, options: dict, batch_size: int | None = None) -> Request:
        """The one validation of a call (``generate``, ``check``, ``generate_batches``): the arguments, the
        step cache, the memory of one call (or one batch) and the scheduler's grid, before any work."""
        req = request.build(self.rules, prompt, negative_prompt, **options)
        n = len(req.prompts)
        if batch_size is None and n > request.MAX_IMAGES:
            raise ValueError(f"{n} images in one call; at most {request.MAX_IMAGES} (generate_batches makes any "
                             "number, in the memory of one batch)")  # fmt: skip
        self._check_cache(req)
        if batch_size is None:
            self._check_memory(req, batch_name="num_images (or generate_batches)")
        else:
            self._check_memory(request.batch(req, 0, min(batch_size, n)), batch_name="batch_size")
        if req.scheduler is not None:  # its timesteps read now: a step count or size it cannot take fails here
            self._grid(req)
        return req

    def _memory_settings(self, req: Request) -> dict:
        guided = req.guidance_on and not self.components.guidance_embedding_dim  # two denoiser passes per call
        return dict(batch=len(req.prompts), height=req.height, width=req.width, dtype_size=self.dtype.itemsize,
                    guided=guided, image_to_image=req.image is not None, decode=req.output_type != "latent",
                    tokens=self.model.denoiser_tokens(req.height, req.width))  # fmt: skip

    def _check_memory(self, req: Request, batch_name: str) -> None:
        memory.check(self.components, self.device, batch_name=batch_name, trained_size=self.default_size,
                     **self._memory_settings(req))  # fmt: skip

    def _check_cache(self, req: Request) -> None:
        if req.cache is None:
            return
        if req.control is not None:
            raise ValueError("cache= does not run with ControlNets yet: the cached passes leave out their residuals")
        if not self.backend.caches_steps:
            raise ValueError(f"cache= needs a torch-based backend (torch, compile, triton): the {self.backend.name} "
                             f"backend runs its exported graph whole")  # fmt: skip
        self.model.check_cache(req.cache)

    # ------------------------------------------------------------------------------------ the stages
    def _run(self, req: Request, cancel=None) -> Result:
        """One checked call, its stages top to bottom (one call at a time: the backend's buffers are shared)."""
        if cancel is not None and not callable(cancel):
            raise ValueError(f"cancel must be a callable returning True to stop the call, got {type(cancel).__name__}")
        cancel = cancel or _never
        with self._lock:
            clock = Clock(self.device)
            marks = {"start": clock.mark()}
            cond, uncond = self._encode(req)
            marks["encoded"] = clock.mark()
            image_latents = None if req.image is None else self._encode_latents(req.image)
            marks["image"] = clock.mark()
            plan, inputs, generators = self._prepare(req, cond, uncond, image_latents)
            _stop_if(cancel, "before denoising")
            x, call_marks, tally = self._denoise(req, plan, inputs, generators, clock, cancel)
            marks["denoised"] = clock.mark()
            _stop_if(cancel, "before decoding")
            self._require_finite(x, req, plan.name)  # after the mark: its host sync is not denoising
            images = x if req.output_type == "latent" else self._decode_output(req, x)
            marks["end"] = clock.mark()
            result = Result(convert(images, req.output_type), list(req.seeds),
                            _stage_times(clock, marks, call_marks, tally, req), plan.name)  # fmt: skip
            self.stages, self.last_seeds = result.stages, result.seeds
        return result

    # ---------------------------------------------------------------------------------- encode
    def _encode(self, req: Request):
        """Conditioning for the prompts and, when classifier-free guidance is on, the unconditional branch (the
        model's). Guidance-distilled models (LCM U-Nets, FLUX.1-dev) get their scale as an input instead: one
        pass, unless ``true_cfg`` asks for classifier-free guidance on top (FLUX.1-dev)."""
        model, run = self.model, self.backend.run
        size = (req.height, req.width, self.device, req.max_sequence_length)
        cond = model.encode(run, req.prompts, *size)
        embedded = model.embedded_guidance(req.guidance, len(req.prompts), cond["encoder_hidden_states"])
        if embedded is not None:
            cond = {**cond, **embedded}
            if self.components.guidance_embedding_dim:  # LCM: consistency sampling has no unconditional branch
                return cond, None
        if not req.guidance_on:
            return cond, None
        uncond = model.unconditional(run, req.negatives, cond, *size)
        return cond, uncond if embedded is None else {**uncond, **embedded}

    def encode_image(self, picture) -> torch.Tensor:
        """Scaled latents of a picture (a PIL image, array or tensor in [0, 1], as ``image=`` takes)."""
        pictures = to_tensor(picture, "image")
        return self._encode_latents(image_tensor(pictures, pictures.shape[0]))

    def _encode_latents(self, image: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images [N, 3, H, W] in [-1, 1]."""
        vae = self.components.vae.config
        latent = self.backend.run("vae_encoder", image=image.to(self.device))["latent"].to(torch.float32)
        return (latent - (vae.get("shift_factor") or 0.0)) * vae.scaling_factor

    # --------------------------------------------------------------------------------- prepare
    def _grid(self, req: Request) -> tuple[str, Grid, dict]:
        """The sampler, its grid and options: a configured diffusers scheduler's, or from the model's schedule."""
        scheduler, components = self.components.scheduler, self.components
        if req.scheduler is not None:
            options = self.model.timestep_options(req.scheduler, req.steps, req.height, req.width)
            return samplers.from_diffusers(req.scheduler, req.steps, **options)
        if self.model.uses_scheduler_grid():
            # consistency models: the LCM scheduler's own timesteps; SD3/FLUX: their shifted flow grids
            options = self.model.timestep_options(scheduler, req.steps, req.height, req.width)
            return req.sampler, samplers.from_diffusers(scheduler, req.steps, **options)[1], req.sampler_options
        if components.is_flow:
            return req.sampler, flow_grid(req.steps, shift=scheduler.config.get("shift", 1.0)), req.sampler_options
        schedule = VPSchedule(scheduler.alphas_cumprod)
        offset = scheduler.config.get("steps_offset", 0) if req.spacing == "leading" else 0
        return req.sampler, vp_grid(schedule, req.steps, spacing=req.spacing, steps_offset=offset), req.sampler_options

    def _prepare(self, req: Request, cond, uncond, image_latents) -> tuple[samplers.Plan, LoopInputs, list]:
        """The sampler's plan, the loop's inputs and each image's CPU generator. Noise is drawn with one CPU
        generator per seed, as diffusers draws it; the start is scaled noise, or for image-to-image the image
        noised to the first level the strength leaves."""
        name, grid, options = self._grid(req)
        shape = self.model.latent_shape(req.height, req.width)
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]
        if image_latents is not None and req.step_noise == "diffusers":
            # diffusers samples the VAE posterior first (diffrt takes its mean): its draw, to keep the order
            for generator in generators:
                torch.randn(image_latents.shape[1:], generator=generator)
        noise = torch.stack([torch.randn(shape, generator=generator) for generator in generators]).to(self.device)
        if image_latents is None or req.strength >= 1.0:
            x = noise * grid.init_scale
        else:
            grid = _skip_start(grid, req.strength)
            x = float(grid.alphas[0]) * image_latents + float(grid.sigmas[0]) * noise
        plan = samplers.prepare(name, grid, self.device, torch.float32, **options)
        inputs = LoopInputs(x.to(torch.float32), cond, uncond)
        if req.control is not None:
            # as the ControlNets see them: doubled for classifier-free guidance (both halves of the batch), except
            # in guess mode, where only the conditional half runs a ControlNet (as diffusers)
            both = _guided(uncond, req) and not req.control.guess_mode
            images = [image.to(self.device, self.dtype) for image in req.control.images]
            inputs.control_images = [torch.cat([image, image]) if both else image for image in images]
            inputs.control_scales = torch.tensor(req.control.scales, dtype=torch.float32, device=self.device)
        if req.mask is not None:
            mask = latent_mask(req.mask, self.vae_scale_factor, self.device)
            if self.components.inpainting_unet:  # it sees the mask itself: no blending
                masked = self._encode_latents(req.image * (req.mask < 0.5).to(req.image.device))
                inputs.unet_extra = torch.cat([mask, masked], dim=1)
            else:  # latent blending: the kept latents pasted back at each step and at the end
                inputs.repaint, inputs.image_latents = mask, image_latents
        return plan, inputs, generators

    # ---------------------------------------------------------------------------------- denoise
    def _denoise(self, req: Request, plan, inputs: LoopInputs, generators, clock: Clock, cancel):
        """The sampling loop: captured as one CUDA graph when the backend can, the sampler is deterministic and
        a step cache (if any) has a fixed schedule, else eager with per-call timing; then the kept latents
        pasted back (inpainting by blending). Returns (latents, call marks, the step cache's (full, cached) call
        counts or None)."""
        settings = LoopSettings(req.cfg_scale, req.guidance_rescale, model_calls(plan), req.cache, req.control,
                                _guided(inputs.uncond, req))  # fmt: skip
        capture, cache = self.backend.loop_capture, req.cache
        if capture is not None and not samplers.get(plan.name).stochastic and (cache is None or cache.static):
            x, marks, tally = self._denoise_captured(capture, plan, inputs, settings), [], None
            if cache is not None:  # the captured schedule is fixed: count it rather than run it
                full = step_cache.static_full_calls(cache, settings.calls)
                tally = (full, settings.calls - full)
        else:
            if capture is not None:  # say why this call is slower
                why = (f"sampler {req.sampler} draws noise per step" if cache is None or cache.static
                       else f"step cache {cache} decides on the host at each call")  # fmt: skip
                log.info("%s: its loop runs eagerly, not as a CUDA graph", why)
            x, marks, tally = self._denoise_eager(req, plan, inputs, settings, generators, clock, cancel)
        if inputs.repaint is not None:
            x = inputs.repaint * x + (1 - inputs.repaint) * inputs.image_latents
        return x, marks, tally

    def _denoiser(self, inputs: LoopInputs, settings: LoopSettings):
        """The model as a denoiser over ``inputs``, and its step-cache session (or None): classifier-free
        guidance as one batched call, a 9-channel U-Net's extra inputs, the ControlNets' residuals, the
        prediction type (or the consistency parametrisation), latent blending when inpainting. The one builder
        of both loops: it reads plain values and the inputs' tensors, never the call that made them."""
        session = None if settings.cache is None else step_cache.CacheSession(settings.cache, settings.calls)
        control_loop = None if settings.control is None else self._control_loop(inputs, settings)
        backend, graph, dtype = self.backend, self.model.denoiser_part, self.dtype

        def call_model(x, t, conditioning):
            timestep = t.to(torch.float32).expand(x.shape[0])
            named = dict(sample=x.to(dtype), timestep=timestep, **conditioning)
            if control_loop is not None:
                named.update(control_loop.residuals(backend.run, named["sample"], timestep, conditioning))
            if session is not None:
                return backend.run_cached(graph, session, **named)["out"]
            return backend.run(graph, **named)["out"]

        model = denoisers.guided_model(call_model, inputs.cond, inputs.uncond, settings.guidance, settings.rescale)
        if inputs.unet_extra is not None:
            model = denoisers.with_extra_channels(model, inputs.unet_extra)
        components = self.components
        if components.is_consistency:
            scaling = components.scheduler.config.get("timestep_scaling", 10.0)
            denoiser = denoisers.consistency_denoiser(model, components.prediction_type, timestep_scaling=scaling)
        else:
            denoiser = denoisers.prediction_denoiser(model, components.prediction_type)
        if inputs.repaint is not None:
            denoiser = denoisers.masked_denoiser(denoiser, inputs.repaint, inputs.image_latents)
        return denoiser, session

    def _control_loop(self, inputs: LoopInputs, settings: LoopSettings) -> control.ControlLoop:
        """A fresh :class:`~diffrt.models.control.ControlLoop` (its call count starts at 0) over the loop's
        control images."""
        graphs = self.model.control_graphs()
        residuals, factor = self.backend.specs[graphs[0]].outputs, self.vae_scale_factor

        def zeros(sample):
            values = {"batch": sample.shape[0], "height": sample.shape[2] * factor, "width": sample.shape[3] * factor}
            return {t.name: sample.new_zeros(t.shape(values)) for t in residuals}

        # guess mode weights the residuals from 0.1 (the first) to 1 (the mid block's), as diffusers does
        ramp = torch.logspace(-1, 0, len(residuals), device=self.device) if settings.control.guess_mode else None
        return control.ControlLoop(settings.control.keeps(settings.calls), graphs, inputs.control_images,
                                   inputs.control_scales, ramp=ramp, guided=settings.guided,
                                   channels=self.components.latent_channels, zeros=zeros)  # fmt: skip

    def _denoise_eager(self, req: Request, plan, inputs: LoopInputs, settings: LoopSettings, generators,
                       clock: Clock, cancel):  # fmt: skip
        """Step by step, timing each model call (events on CUDA: no syncs), with a progress bar (plain lines
        every few seconds when stderr is not a terminal)."""
        from tqdm.auto import tqdm

        denoiser, session = self._denoiser(inputs, settings)
        step_generators = generators if req.step_noise == "diffusers" else [
            torch.Generator(self.device).manual_seed((s + _STEP_SEED_OFFSET) % 2**63) for s in req.seeds
        ]  # fmt: skip
        calls, marks = settings.calls, []
        bar = tqdm(total=calls, desc="denoising", leave=False) if req.progress else ProgressLines(calls, "denoising")
        with bar:

            def timed(x, alpha, sigma, t):
                _stop_if(cancel, f"after {len(marks) // 2} of {calls} denoiser calls")
                marks.append(clock.mark())
                out = denoiser(x, alpha, sigma, t)
                marks.append(clock.mark())
                bar.update(1)
                return out

            x = samplers.run(plan, timed, inputs.x, step_generators)
        tally = None if session is None else (session.full_calls, session.cached_calls)
        return x, marks, tally

    def _denoise_captured(self, capture, plan, inputs: LoopInputs, settings: LoopSettings) -> torch.Tensor:
        """The whole loop as one CUDA graph per setting (no per-step timings: the steps run as one launch).

        Every tensor of ``inputs`` is a graph input, and the loop reads nothing else but the plan and the
        settings, which the key holds (see :mod:`diffrt.backends.graphs`)."""

        def loop(**buffers):
            captured = LoopInputs.unflatten(buffers)
            denoiser, _ = self._denoiser(captured, settings)  # a fresh step-cache session at every capture
            return samplers.run(plan, denoiser, captured.x)

        cache_key = None if settings.cache is None else settings.cache.key
        control_key = None if settings.control is None else settings.control.key
        key = ("loop", plan.host_key, float(settings.guidance), float(settings.rescale), cache_key, control_key,
               self.backend.capture_state())  # fmt: skip
        return capture.run(key, loop, inputs.flatten())

    # ----------------------------------------------------------------------------------- decode
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] from scaled latents; a float16 VAE that overflows (non-finite pixels)
        is upcast to float32 once and the batch decoded again (``vae_precision="auto"``)."""
        vae = self.components.vae.config
        z = latents / vae.scaling_factor + (vae.get("shift_factor") or 0.0)
        image = self.backend.run("vae_decoder", latent=z)["image"]
        finite = bool(torch.isfinite(image).all())
        if self.vae_precision == "auto" and not finite:
            log.warning("the %s VAE overflowed (non-finite pixels); decoding in float32 from now on", image.dtype)
            self.backend.upcast_vae()
            image = self.backend.run("vae_decoder", latent=z)["image"]
            finite = bool(torch.isfinite(image).all())
        if not finite:
            raise ValueError(f"the VAE decoder gave non-finite pixels ({image.dtype}) from finite latents")
        return (image.to(torch.float32) / 2 + 0.5).clamp(0, 1)

    def _require_finite(self, latents: torch.Tensor, req: Request, sampler: str) -> None:
        """Never hand back a NaN/inf image as if it were one (one host sync per call, after the loop); the
        message names the likely causes, the loaded adapters and a 16-bit dtype first."""
        if bool(torch.isfinite(latents).all()):
            return
        causes = []
        if self.loras:
            loaded = ", ".join(f"{name} at {info['scale']:g}" for name, info in self.loras.items())
            causes.append(f"the LoRA(s) loaded ({loaded}): unload them or lower their scales")
        if self.dtype != torch.float32:
            causes.append(f"the {str(self.dtype).removeprefix('torch.')} weights: run in float32")
        causes.append(f"the guidance {req.guidance:g}: lower it")
        raise ValueError(f"the latents came out non-finite (NaN or inf) after {req.steps} steps of {sampler}; likely "
                         f"causes: {'; '.join(causes)}")  # fmt: skip

    def _decode_output(self, req: Request, latents: torch.Tensor) -> torch.Tensor:
        images = self.decode(latents)
        if req.mask is not None and req.overlay:
            # paste the untouched pixels back: the VAE decoder's receptive field is global
            mask = req.mask.to(images.device)
            images = mask * images + (1 - mask) * (req.image.to(images.device) / 2 + 0.5)
        return images


def _guided(uncond, req: Request) -> bool:
    """Whether the model's batch holds both halves of classifier-free guidance (as ``guided_model`` runs it)."""
    return uncond is not None and req.cfg_scale != 1


def _stage_times(clock: Clock, marks: dict, call_marks: list, tally, req: Request) -> StageTimes:
    """A call's stage times from its marks (``call_marks``: before and after each model call)."""
    times = StageTimes()
    times.text_encode_ms = clock.ms(marks["start"], marks["encoded"])
    times.vae_encode_ms = clock.ms(marks["encoded"], marks["image"]) if req.image is not None else 0.0
    times.unet_calls_ms = [clock.ms(a, b) for a, b in zip(call_marks[::2], call_marks[1::2], strict=True)]
    times.denoise_ms = clock.ms(marks["image"], marks["denoised"])
    if tally is not None:
        times.full_calls, times.cached_calls = tally
    times.vae_decode_ms = clock.ms(marks["denoised"], marks["end"]) if req.output_type != "latent" else 0.0
    times.total_ms = clock.ms(marks["start"], marks["end"])
    return times


def _never() -> bool:
    return False


def _stop_if(cancel, where: str) -> None:
    if cancel():
        raise Cancelled(f"the call was cancelled {where}")


def _skip_start(grid: Grid, strength: float) -> Grid:
    """Image-to-image, as diffusers: skip the first (1 - strength) share of the steps."""
    first = grid.steps - min(int(grid.steps * strength), grid.steps)
    if first >= grid.steps:
        raise ValueError(f"strength {strength} with {grid.steps} steps leaves no step to run; raise either")
    return Grid(grid.alphas[first:], grid.sigmas[first:], grid.timesteps[first:], grid.init_scale, grid.kind)

