"""Test-wide setup: 8 fake CPU devices (for the sharding tests) and float32 matmuls.

Must run before jax is imported anywhere, which conftest.py guarantees.
"""

import os

# XLA's default (LLVM) optimisation. Level 0 compiled a little faster but ran ~5x slower: a
# tiny training step took 3 CPU-s instead of 0.6, and with the persistent cache below most
# programs are compiled once and run many times (test_train.py: 178 CPU-s against 198, and 140 s
# wall against 192, measured back to back).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
# Programs that compile in under 50 ms (eager ops, by the thousand) are not cached: with the size
# limit below, each write lists the whole folder and reads every entry's access time, so the
# cost of a write grew with the cache (66 ms per write at 2,200 entries, and the whole suite
# wrote ~3,000), well above compiling such a program again. The train step's pieces take longer.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# A size limit turns on JAX's LRU cache, whose reads and writes hold a file lock: two workers
# (or a worker and test_multiprocess's subprocesses) that write the same entry at once could
# otherwise interleave their bytes. The limit itself is never reached.
jax.config.update("jax_compilation_cache_max_size", 64 * 2**30)

# The files that take longest, longest first (seconds on one worker, 2026-12-06: test_demo.py
# ~180 (one subprocess run), test_multiprocess.py ~150, test_train.py ~140, test_recovery.py
# ~130, test_sweep.py ~130, test_rahf.py ~100, test_attention.py, test_launch.py,
# test_lora_io.py, test_pipeline.py 40 to 80, then 10 to 50 each).
# pytest-xdist's loadfile hands out whole files in collection order, but by default reorders
# them by their number of tests, which put these few-test files last: one worker ran
# test_demo.py or test_multiprocess.py alone at the end while the other sat idle. Longest
# first, the short files fill in at the end.
LONGEST_FIRST = (
    "test_demo.py", "test_multiprocess.py", "test_train.py", "test_recovery.py", "test_sweep.py",
    "test_rahf.py", "test_attention.py", "test_launch.py", "test_lora_io.py", "test_pipeline.py",
    "test_step_pieces.py", "test_lora.py", "test_memory_settings.py", "test_train_reward.py",
    "test_sampling.py", "test_sweep_eval.py", "test_probe_gaps.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  # A stable sort: the tests of each file keep their order, the other files theirs.
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
