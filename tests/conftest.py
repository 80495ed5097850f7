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
# resume, and in test_train.py and test_recovery.py alike): a persistent compilation cache per
# session turns the repeats into cache hits. One cache for the whole session: the folder is
# made where this file is first imported (the controller under pytest-xdist, which starts its
# workers after) and handed on in an environment variable of the tests' own, so both workers
# share it. Not JAX_COMPILATION_CACHE_DIR: the subprocesses that tests start would inherit it,
# and some of them check the cache folder their config names (test_inputs, test_compilation).
_CACHE_VAR = "FNF_JAX_TEST_COMPILATION_CACHE"
if not os.environ.get(_CACHE_VAR):
  os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="fnf_jax_cc_")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# A size limit turns on JAX's LRU cache, whose reads and writes hold a file lock: two workers
# (or a worker and test_multiprocess's subprocesses) that write the same entry at once could
# otherwise interleave their bytes. The limit itself is never reached.
jax.config.update("jax_compilation_cache_max_size", 64 * 2**30)

# The files that take longest, longest first (seconds on one worker, 2026-12: test_train.py
# 230, test_recovery.py 190, test_demo.py 180, test_multiprocess.py 130, test_memory_settings.py
# 100 to 200 (one test), test_launch.py 100, test_rahf.py 85, then 35 to 80 each).
# pytest-xdist's loadfile hands out whole files in collection order, but by default reorders
# them by their number of tests, which put these few-test files last: one worker ran
# test_demo.py or test_multiprocess.py alone at the end while the other sat idle. Longest
# first, the short files fill in at the end.
LONGEST_FIRST = (
    "test_train.py", "test_recovery.py", "test_demo.py", "test_multiprocess.py",
    "test_memory_settings.py", "test_launch.py", "test_rahf.py", "test_lora_io.py",
    "test_attention.py", "test_pipeline.py", "test_step_pieces.py", "test_lora.py",
    "test_probe_gaps.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  # A stable sort: the tests of each file keep their order, the other files theirs.
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
