"""The text-to-image pipeline: encode prompts, run a sampler over the U-Net, decode latents.

It talks to the model only through a backend (:mod:`diffrt.backends`), asks the model's family
(:mod:`diffrt.families`) how prompts become conditioning and how latents are shaped, and samples only through
:mod:`diffrt.samplers`, so every backend runs every sampler on every family.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from . import control, defaults, denoisers, families, inversion, lora, memory, request, samplers, step_cache
from .devices import DTYPE_NAMES, resolve_device, resolve_device_dtype  # noqa: F401  (resolve_*: earlier home)
from .families.base import guidance_embedding  # noqa: F401  (earlier home)
from .images import OUTPUT_TYPES, convert, image_tensor, latent_mask, to_tensor  # noqa: F401
from .request import SPACINGS, Request  # noqa: F401  (SPACINGS: earlier home)
from .schedules import Grid, VPSchedule, flow_grid, vp_grid
from .timing import Clock, ProgressLines, StageTimes

log = logging.getLogger(__name__)

VAE_PRECISIONS = ("auto", "fp32", "model")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the earlier table of dtype names
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


@dataclass
class Start:
    """Where the loop starts: the sampler's plan, the state, and the tensors each denoiser call reads."""

    plan: samplers.Plan
    x: torch.Tensor
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    image_latents: torch.Tensor | None = None  # image-to-image / inpainting: the encoded picture
    repaint: torch.Tensor | None = None  # latent blending (4-channel U-Nets): 1 = generate
    unet_extra: torch.Tensor | None = None  # 9-channel inpainting U-Nets: [mask, masked-image latents]
    control_images: list[torch.Tensor] | None = None  # per ControlNet, the rows it sees (diffrt.control)
    control_scales: torch.Tensor | None = None  # [ControlNets] float32
    generators: list | None = None  # each image's CPU generator, after its initial noise (step_noise="diffusers")


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
        self.family = families.of(components)
        self.backend = backend
        self.device, self.dtype = device, dtype
        self.vae_precision = vae_precision
        if vae_precision == "fp32" and dtype != torch.float32:
            backend.upcast_vae()
        self.stages = StageTimes()
        self.last_seeds: list[int] = []
        self._lock = threading.Lock()
        self._adapters: lora.Adapters | None = None

    # ------------------------------------------------------------------------------------ info
    @property
    def vae_scale_factor(self) -> int:
        return self.components.vae_scale_factor

    @property
    def min_size(self) -> int:
        """Smallest height/width: the U-Net halves the latent once per down block but the last."""
        return self.family.size_multiple(self.components)

    @property
    def default_size(self) -> int:
        return self.family.default_size(self.components)

    @property
    def defaults(self) -> defaults.Defaults:
        """The model's sampling defaults (steps, sampler, guidance, ...): what a call uses for what it leaves
        unset, with where each came from (``.sources``, ``.describe()``; see :mod:`diffrt.defaults`)."""
        return defaults.Defaults(self.components.defaults, self.components.default_sources)

    @property
    def rules(self) -> request.Rules:
        max_steps = None
        if self.components.is_consistency:
            max_steps = self.components.scheduler.config.get("original_inference_steps")
        family, components = self.family, self.components
        distilled = family.guidance_distilled(components) and not components.guidance_embedding_dim
        return request.Rules(components.defaults, family.size_step(components), self.min_size, self.default_size,
                             components.inpainting_unet, max_steps, distilled,
                             family.max_sequence_length(components), family.max_size(components),
                             len(components.controlnets), components.scheduler)  # fmt: skip

    def __repr__(self):
        weights = ", RANDOM weights" if self.components.random_weights else ""
        return (
            f"Pipeline({self.components.name!r}, family={self.components.family}, backend={self.backend.name}, "
            f"device={self.device}, dtype={self.dtype}{weights})"
        )

    # ------------------------------------------------------------------------------------ LoRA
    @property
    def loras(self) -> dict[str, dict]:
        """The loaded LoRAs: ``{name: {path, scale, ranks, layers, parts, targets}}``."""
        return self._adapters.info() if self._adapters else {}

    def load_lora(self, path, name: str | None = None, scale: float = 1.0) -> str:
        """Merge the LoRA at ``path`` (a .safetensors file, or a folder holding pytorch_lora_weights.safetensors;
        diffusers/PEFT or kohya keys) into the weights at ``scale``; returns its name (default: the file's)."""
        with self._lock:
            return self._lora_adapters().load(path, name, scale).name

    def set_loras(self, scales: dict[str, float]) -> None:
        """Set the scales of loaded LoRAs by name (0 disables one): only the touched weights are rewritten."""
        with self._lock:
            self._lora_adapters().set(scales)

    def unload_lora(self, name: str) -> None:
        """Remove a LoRA: the weights it touched go back to what the others (or the base model) make them."""
        with self._lock:
            self._lora_adapters().unload(name)

    def load_textual_inversion(self, path, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding (safetensors: ``emb_params``, SDXL ``clip_l``/``clip_g``, or
        diffusers' ``{token: vectors}``); returns its tokens (default token: the file's own, else its name)."""
        tables = getattr(self.backend, "token_table", None)  # exported text encoders: their embedding initializer
        if not getattr(self.backend, "adds_tokens", False) and tables is None:
            raise ValueError(f"the {self.backend.name} backend cannot grow its text encoders' vocabulary: load "
                             "textual inversions with the torch, compile, triton or onnxruntime backend")  # fmt: skip
        if self.components.deployed:
            raise ValueError("a deployed export has no text-encoder modules to add tokens to: load the model it was "
                             "exported from")  # fmt: skip
        encoders = self.components.text_encoders
        with self._lock:
            writers = None  # located before anything changes: a graph without that initializer fails here
            if tables is not None:
                writers = [tables(graph, encoder.get_input_embeddings().weight)
                           for graph, encoder in zip(self.family.text_graphs(self.components), encoders,
                                                     strict=True)]  # fmt: skip
            tokens, changed = inversion.load(self.components, path, token)
            for index in changed if writers else ():
                writers[index](encoders[index].get_input_embeddings().weight)
            return tokens

    def _lora_adapters(self) -> lora.Adapters:
        if self._adapters is None:
            write = getattr(self.backend, "write_weights", None)
            if write is None:
                raise ValueError(f"the {self.backend.name} backend cannot replace weights, so it takes no LoRA")
            self._adapters = lora.Adapters(self.components, write, getattr(self.backend, "weights_in_place", False))
        return self._adapters

    # ------------------------------------------------------------------------------------ call
    def __call__(self, prompt, negative_prompt=None, **options):
        """Generate images: a list of PIL images (or np / pt arrays in [0, 1], or latents). The options
        (steps, sampler, guidance, seed, num_images, height, width, image, mask_image, ...) are those of
        :func:`diffrt.request.build`."""
        return self.generate(prompt, negative_prompt, **options).images

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
        self.family.tokenize(self.components, [*req.prompts, *(req.negatives or ())], req.max_sequence_length)

    def _checked(self, prompt, negative_prompt, options: dict) -> Request:
        req = request.build(self.rules, prompt, negative_prompt, **options)
        if len(req.prompts) > request.MAX_IMAGES:
            raise ValueError(f"{len(req.prompts)} images in one call; at most {request.MAX_IMAGES} (generate_batches "
                             "makes any number, in the memory of one batch)")  # fmt: skip
        self._check_cache(req)
        self._check_memory(req, batch_name="num_images (or generate_batches)")
        self._check_grid(req)
        return req

    def _check_grid(self, req: Request) -> None:
        """A scheduler's timesteps are read now: a step count or size it cannot take fails before any work."""
        if req.scheduler is not None:
            self._grid(req)

    def generate_batches(self, prompt, negative_prompt=None, *, batch_size: int = 8, cancel=None, **options):
        """Yield one :class:`Result` per batch of at most ``batch_size`` images, in order: memory stays that of
        one batch whatever ``num_images`` is. Image k is the same as from ``generate`` (seed s + k)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        req = request.build(self.rules, prompt, negative_prompt, **options)
        n = len(req.prompts)
        self._check_cache(req)
        self._check_memory(request.batch(req, 0, min(batch_size, n)), batch_name="batch_size")
        self._check_grid(req)
        for first in range(0, n, batch_size):
            yield self._run(request.batch(req, first, min(first + batch_size, n)), cancel)

    def estimate_memory(self, prompt="", negative_prompt=None, **options) -> memory.Estimate:
        """The activation memory a call with these options needs (see :mod:`diffrt.memory`), without running it."""
        return memory.estimate(self.components, **self._memory_settings(request.build(self.rules, prompt,
                                                                                      negative_prompt, **options)))

    def _memory_settings(self, req: Request) -> dict:
        guided = req.guidance_on and not self.components.guidance_embedding_dim  # two denoiser passes per call
        return dict(batch=len(req.prompts), height=req.height, width=req.width, dtype_size=self.dtype.itemsize,
                    guided=guided, image_to_image=req.image is not None, decode=req.output_type != "latent",
                    tokens=self.family.denoiser_tokens(self.components, req.height, req.width))  # fmt: skip

    def _check_memory(self, req: Request, batch_name: str) -> None:
        memory.check(self.components, self.device, batch_name=batch_name, trained_size=self.default_size,
                     **self._memory_settings(req))  # fmt: skip

    def _check_cache(self, req: Request) -> None:
        if req.cache is None:
            return
        if req.control is not None:
            raise ValueError("cache= does not run with ControlNets yet: the cached passes leave out their residuals")
        if not hasattr(self.backend, "run_cached"):
            raise ValueError(f"cache= needs a torch-based backend (torch, compile, triton): the {self.backend.name} "
                             f"backend runs its exported graph whole")  # fmt: skip
        self.family.check_cache(self.components, req.cache)

    def _run(self, req: Request, cancel=None) -> Result:
        if cancel is not None and not callable(cancel):
            raise ValueError(f"cancel must be a callable returning True to stop the call, got {type(cancel).__name__}")
        with self._lock:
            result = self._generate(req, cancel or _never)
            self.stages, self.last_seeds = result.stages, result.seeds
        return result

    def _generate(self, req: Request, cancel) -> Result:
        clock, times = Clock(self.device), StageTimes()
        t_start = clock.mark()
        cond, uncond = self._encode(req)
        t_encoded = clock.mark()
        image_latents = None if req.image is None else self._encode_latents(req.image)
        t_image = clock.mark()
        start = self._start(req, cond, uncond, image_latents)
        _stop_if(cancel, "before denoising")
        x, unet_marks, tally = self._denoise(req, start, clock, cancel)
        t_denoised = clock.mark()
        _stop_if(cancel, "before decoding")
        self._require_finite(x, req, start.plan.name)  # after the mark: its host sync is not denoising
        result = x if req.output_type == "latent" else self._decode_output(req, x)
        t_end = clock.mark()

        times.text_encode_ms = clock.ms(t_start, t_encoded)
        times.vae_encode_ms = clock.ms(t_encoded, t_image) if req.image is not None else 0.0
        times.unet_calls_ms = [clock.ms(a, b) for a, b in zip(unet_marks[::2], unet_marks[1::2], strict=True)]
        times.denoise_ms = clock.ms(t_image, t_denoised)
        if tally is not None:
            times.full_calls, times.cached_calls = tally
        times.vae_decode_ms = clock.ms(t_denoised, t_end) if req.output_type != "latent" else 0.0
        times.total_ms = clock.ms(t_start, t_end)
        return Result(convert(result, req.output_type), list(req.seeds), times, start.plan.name)

    # ---------------------------------------------------------------------------------- encode
    def _encode(self, req: Request):
        """Conditioning for the prompts and, when classifier-free guidance is on, the unconditional branch (the
        family's). Guidance-distilled models (LCM U-Nets, FLUX.1-dev) get their scale as an input instead: one
        pass, unless ``true_cfg`` asks for classifier-free guidance on top (FLUX.1-dev)."""
        family, run, parts = self.family, self.backend.run, self.components
        size = (req.height, req.width, self.device, req.max_sequence_length)
        cond = family.encode(run, parts, req.prompts, *size)
        embedded = family.embedded_guidance(parts, req.guidance, len(req.prompts), cond["encoder_hidden_states"])
        if embedded is not None:
            cond = {**cond, **embedded}
            if parts.guidance_embedding_dim:  # LCM: consistency sampling has no unconditional branch
                return cond, None
        if not req.guidance_on:
            return cond, None
        uncond = family.unconditional(run, parts, req.negatives, cond, *size)
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

    # -------------------------------------------------------------------------------- plan/start
    def _grid(self, req: Request) -> tuple[str, Grid, dict]:
        """The sampler, its grid and options: a configured diffusers scheduler's, or from the model's schedule."""
        scheduler, components = self.components.scheduler, self.components
        if req.scheduler is not None:
            return samplers.from_diffusers(req.scheduler, req.steps, **self._timestep_options(req.scheduler, req))
        if self.family.uses_scheduler_grid(components):
            # consistency models: the LCM scheduler's own timesteps; SD3/FLUX: their shifted flow grids
            grid = samplers.from_diffusers(scheduler, req.steps, **self._timestep_options(scheduler, req))[1]
            return req.sampler, grid, req.sampler_options
        if components.is_flow:
            return req.sampler, flow_grid(req.steps, shift=scheduler.config.get("shift", 1.0)), req.sampler_options
        schedule = VPSchedule(scheduler.alphas_cumprod)
        offset = scheduler.config.get("steps_offset", 0) if req.spacing == "leading" else 0
        return req.sampler, vp_grid(schedule, req.steps, spacing=req.spacing, steps_offset=offset), req.sampler_options

    def _timestep_options(self, scheduler, req: Request) -> dict:
        return self.family.timestep_options(self.components, scheduler, req.steps, req.height, req.width)

    def _start(self, req: Request, cond, uncond, image_latents) -> Start:
        """Noise (one CPU generator per seed, as diffusers draws it), the sampler's plan, and the starting state:
        scaled noise, or for image-to-image the image noised to the first level the strength leaves."""
        name, grid, options = self._grid(req)
        shape = self.family.latent_shape(self.components, req.height, req.width)
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
        start = Start(samplers.prepare(name, grid, self.device, torch.float32, **options), x.to(torch.float32),
                      cond, uncond, image_latents, generators=generators)  # fmt: skip
        if req.control is not None:
            self._start_control(start, req)
        if req.mask is not None:
            mask = latent_mask(req.mask, self.vae_scale_factor, self.device)
            if self.components.inpainting_unet:  # it sees the mask itself: no blending
                masked = self._encode_latents(req.image * (req.mask < 0.5).to(req.image.device))
                start.unet_extra = torch.cat([mask, masked], dim=1)
            else:
                start.repaint = mask
        return start

    def _start_control(self, start: Start, req: Request) -> None:
        """The control images as the ControlNets see them: doubled for classifier-free guidance (both halves of
        the batch), except in guess mode, where only the conditional half runs a ControlNet (as diffusers)."""
        both = _guided(start, req) and not req.control.guess_mode
        images = [image.to(self.device, self.dtype) for image in req.control.images]
        start.control_images = [torch.cat([image, image]) if both else image for image in images]
        start.control_scales = torch.tensor(req.control.scales, dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------------------------- denoise
    def _unet(self, x, t, conditioning, session=None, control_loop=None):
        timestep = t.to(torch.float32).expand(x.shape[0])
        inputs, graph = dict(sample=x.to(self.dtype), timestep=timestep, **conditioning), self.family.denoiser_part
        if control_loop is not None:
            inputs.update(control_loop.residuals(self.backend.run, inputs["sample"], timestep, conditioning))
        if session is not None:
            return self.backend.run_cached(graph, session, **inputs)["out"]
        return self.backend.run(graph, **inputs)["out"]

    def _control_loop(self, settings: control.Control, calls: int, images, scales, guided: bool):
        """A fresh :class:`~diffrt.control.ControlLoop` (its call count starts at 0) over this call's images."""
        graphs = self.family.control_graphs(self.components)
        residuals, factor = self.backend.specs[graphs[0]].outputs, self.vae_scale_factor

        def zeros(sample):
            values = {"batch": sample.shape[0], "height": sample.shape[2] * factor, "width": sample.shape[3] * factor}
            return {t.name: sample.new_zeros(t.shape(values)) for t in residuals}

        # guess mode weights the residuals from 0.1 (the first) to 1 (the mid block's), as diffusers does
        ramp = torch.logspace(-1, 0, len(residuals), device=self.device) if settings.guess_mode else None
        return control.ControlLoop(settings.keeps(calls), graphs, images, scales, ramp=ramp, guided=guided,
                                   channels=self.components.latent_channels, zeros=zeros)  # fmt: skip

    def _loop_denoiser(self, guidance: float, rescale: float, cond, uncond, image_latents, repaint, unet_extra,
                       session=None, control_loop=None):  # fmt: skip
        """The model as a denoiser: classifier-free guidance as one batched call, a 9-channel U-Net's extra
        inputs, the prediction type (or the consistency parametrisation), latent blending when inpainting,
        the step cache's ``session`` and the ControlNets' ``control_loop`` when there are. Takes plain values,
        not the request: a captured loop must not reach into the call that captured it."""

        def unet(x, t, conditioning):
            return self._unet(x, t, conditioning, session, control_loop)

        model = denoisers.guided_model(unet, cond, uncond, guidance, rescale)
        if unet_extra is not None:
            model = denoisers.with_extra_channels(model, unet_extra)
        components = self.components
        if components.is_consistency:
            scaling = components.scheduler.config.get("timestep_scaling", 10.0)
            denoiser = denoisers.consistency_denoiser(model, components.prediction_type, timestep_scaling=scaling)
        else:
            denoiser = denoisers.prediction_denoiser(model, components.prediction_type)
        return denoiser if repaint is None else denoisers.masked_denoiser(denoiser, repaint, image_latents)

    def _denoise(self, req: Request, start: Start, clock: Clock, cancel) -> tuple[torch.Tensor, list, tuple | None]:
        """The sampling loop: captured as one CUDA graph when the backend can, the sampler is deterministic and
        a step cache (if any) has a fixed schedule, else eager with per-call timing; then the kept latents
        pasted back (inpainting by blending). Also the step cache's (full, cached) call counts, or None."""
        capture, cache, marks = self.backend.loop_capture, req.cache, []
        calls = _model_calls(start.plan)
        if capture is not None and not samplers.get(start.plan.name).stochastic and (cache is None or cache.static):
            x = self._denoise_captured(capture, req, start, calls)
            tally = None
            if cache is not None:  # the captured schedule is fixed: count it rather than run it
                full = step_cache.static_full_calls(cache, calls)
                tally = (full, calls - full)
        else:
            if capture is not None:  # say why this call is slower
                why = (f"sampler {req.sampler} draws noise per step" if cache is None or cache.static
                       else f"step cache {cache} decides on the host at each call")  # fmt: skip
                log.info("%s: its loop runs eagerly, not as a CUDA graph", why)
            session = None if cache is None else step_cache.CacheSession(cache, calls)
            x = self._denoise_eager(req, start, clock, marks, session, calls, cancel)
            tally = None if session is None else (session.full_calls, session.cached_calls)
        if start.repaint is not None:
            x = start.repaint * x + (1 - start.repaint) * start.image_latents
        return x, marks, tally

    def _denoise_eager(self, req: Request, start: Start, clock: Clock, marks: list, session, calls: int, cancel):
        """Step by step, timing each U-Net call (events on CUDA: no syncs), with a progress bar (plain lines
        every few seconds when stderr is not a terminal)."""
        from tqdm.auto import tqdm

        control_loop = None
        if req.control is not None:
            control_loop = self._control_loop(req.control, calls, start.control_images, start.control_scales,
                                              _guided(start, req))  # fmt: skip
        denoiser = self._loop_denoiser(req.cfg_scale, req.guidance_rescale, start.cond, start.uncond,
                                       start.image_latents, start.repaint, start.unet_extra, session,
                                       control_loop)  # fmt: skip
        step_generators = start.generators if req.step_noise == "diffusers" else [
            torch.Generator(self.device).manual_seed((s + _STEP_SEED_OFFSET) % 2**63) for s in req.seeds
        ]  # fmt: skip
        plan = start.plan
        bar = tqdm(total=calls, desc="denoising", leave=False) if req.progress else ProgressLines(calls, "denoising")
        with bar:

            def timed(x, alpha, sigma, t):
                _stop_if(cancel, f"after {len(marks) // 2} of {calls} denoiser calls")
                marks.append(clock.mark())
                out = denoiser(x, alpha, sigma, t)
                marks.append(clock.mark())
                bar.update(1)
                return out

            return samplers.run(plan, timed, start.x, step_generators)

    def _denoise_captured(self, capture, req: Request, start: Start, calls: int) -> torch.Tensor:
        """The whole loop as one CUDA graph per setting (no per-step timings: the steps run as one launch).

        Every per-call tensor is a graph input, and the loop reads nothing else from this call but the plan and
        guidance values, which the key holds (see :mod:`diffrt.graphs`)."""
        inputs = {"x": start.x, **{"cond." + k: v for k, v in start.cond.items()}}
        if start.uncond is not None:
            inputs.update({"uncond." + k: v for k, v in start.uncond.items()})
        if start.repaint is not None:
            inputs.update(repaint=start.repaint, image_latents=start.image_latents)
        if start.unet_extra is not None:
            inputs["unet_extra"] = start.unet_extra
        settings, guided = req.control, _guided(start, req)
        if settings is not None:
            inputs.update({f"control.image.{k}": image for k, image in enumerate(start.control_images)})
            inputs["control.scales"] = start.control_scales
        plan, guidance, rescale, cache = start.plan, req.cfg_scale, req.guidance_rescale, req.cache

        def loop(**buffers):
            def part(prefix):
                return {k[len(prefix) :]: v for k, v in buffers.items() if k.startswith(prefix)} or None

            session = None if cache is None else step_cache.CacheSession(cache, calls)  # fresh at every capture
            control_loop = None
            if settings is not None:
                images = [buffers[f"control.image.{k}"] for k in range(len(settings.images))]
                control_loop = self._control_loop(settings, calls, images, buffers["control.scales"], guided)
            denoiser = self._loop_denoiser(guidance, rescale, part("cond."), part("uncond."),
                                           buffers.get("image_latents"), buffers.get("repaint"),
                                           buffers.get("unet_extra"), session, control_loop)  # fmt: skip
            return samplers.run(plan, denoiser, buffers["x"])

        cache_key = None if cache is None else cache.key
        control_key = None if settings is None else settings.key
        key = ("loop", plan.host_key, float(guidance), float(rescale), cache_key, control_key,
               self.backend.capture_state())  # fmt: skip
        return capture.run(key, loop, inputs)

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


def _guided(start: Start, req: Request) -> bool:
    """Whether the model's batch holds both halves of classifier-free guidance (as ``guided_model`` runs it)."""
    return start.uncond is not None and req.cfg_scale != 1


def _model_calls(plan: samplers.Plan) -> int:
    """How many times the loop calls the model: one per step, two on the steps of a second-order sampler."""
    return plan.levels.steps + sum(plan.static.get("second", []))


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


def __getattr__(name: str):
    if name == "load_pipeline":  # moved up to the assembly layer, which this module may not import
        raise AttributeError("diffrt.pipeline.load_pipeline moved to diffrt.api.load (what diffrt.load calls)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
