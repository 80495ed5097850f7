"""Test-wide setup: 8 fake CPU devices (for the sharding tests) and float32 matmuls.

Must run before jax is imported anywhere, which conftest.py guarantees.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare float32 against PyTorch float32: use full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
