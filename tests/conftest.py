"""Test-wide setup: 8 fake CPU devices (for the sharding tests) and float32 matmuls.

Must run before jax is imported anywhere, which conftest.py guarantees.
"""

import os

# LLVM optimisation off: the test models are tiny, so compiling dominates and running does not.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare float32 against PyTorch float32: use full-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

import tempfile  # noqa: E402

# Many tests compile the same programs (the train step on the same tiny config, again after a
# resume): a per-session persistent compilation cache turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="fnf_jax_cc_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
