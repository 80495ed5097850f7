"""Stable Diffusion as pure functions: the pipeline (load, encode, denoise, decode), the schedulers, the DDIM loop and its gradient, random tiny models."""
