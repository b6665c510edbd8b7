"""Layer 0, the core: schedules, denoiser parameterizations, tokenization, numbers and files checked once, memory
estimates, and small shared helpers. Imports nothing else of diffrt but the samplers (also core)."""
