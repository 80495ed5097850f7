"""Attention for every model family, its kernel chosen per layer (see choice.py, dispatch.py)."""

from fnf_jax.models.attention.choice import (A100, CPU, H100, KERNELS, REQUESTS, TPU, Backend,
                                             Choice, Layer, choose)
from fnf_jax.models.attention.dispatch import (attention, current_backend, hardware_backend,
                                               layer_of, record, simulate)

__all__ = ["A100", "CPU", "H100", "KERNELS", "REQUESTS", "TPU", "Backend", "Choice", "Layer",
           "choose", "attention", "current_backend", "hardware_backend", "layer_of", "record",
           "simulate"]
