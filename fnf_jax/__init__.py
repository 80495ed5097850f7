"""fnf_jax: region-aware reward fine-tuning (Focus-N-Fix) for latent diffusion models in JAX."""

__version__ = "0.1.0"
