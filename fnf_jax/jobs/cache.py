"""The `cache` job: the reference (Î0, M) of every training example, computed once with the
frozen model and written to WORKDIR/reference (fnf_jax/fnf/reference_cache.py), so that
training with `train.reference = "cache"` never samples Î0 again. The train job runs it first
when the cache is missing.
"""

import flax.linen as nn
import jax

from fnf_jax.fnf import reference_cache
from fnf_jax.fnf import run as run_lib
from fnf_jax.runtime import distributed
from fnf_jax.runtime import runlock
from fnf_jax.runtime import sharding


def cache(config, workdir: str, run: run_lib.Run | None = None) -> str:
  """The `cache` job: writes the reference of every training example to WORKDIR/reference."""
  with workdir_held(config, workdir, run):
    return compute(config, workdir, run or run_lib.setup(config))


def compute(config, workdir: str, run: run_lib.Run) -> str:
  """Computes and writes the cache (every process its own rows); returns its folder."""
  # Outputs sharded like the batch, so that each process holds (and writes) its own rows.
  out = (sharding.batch_sharding(run.mesh, 4, run.rules),
         sharding.batch_sharding(run.mesh, 3, run.rules))
  with run.mesh, nn.logical_axis_rules(run.rules):
    reference = jax.jit(run.step.reference, out_shardings=out)
    compute_fn = reference_cache.compute_fn(reference, run.frozen, run.pipe, config,
                                            mesh=run.mesh, rules=run.rules, reward=run.reward)
    return reference_cache.write(workdir, config, run.examples, compute_fn,
                                 shard_size=config.cache.shard_size,
                                 batch_size=config.data.batch_size, dtype=config.cache.dtype)


def workdir_held(config, workdir: str, run: run_lib.Run | None):
  """WORKDIR/run.lock, taken before the models load (the processes must know which of them is
  process 0, hence the cluster first): a second run, or an unwritable workdir, stops at once."""
  if run is None:
    distributed.initialize(config.distributed)
  return runlock.hold(workdir, distributed.is_writer())
