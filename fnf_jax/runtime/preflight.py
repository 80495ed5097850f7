"""The second phase of checking a config: what needs the devices, run once by `main.run_job`
after `validate` (the static phase, fnf_jax/config/validate.py) and before the job's module is
imported, so before any model loads or any workdir is written.

It starts the cluster (a `distributed` block that names no reachable cluster fails here), makes
the mesh, and checks each batch the job splits over it: every device needs whole examples.
"""

from fnf_jax.config import sweep
from fnf_jax.config import validate
from fnf_jax.runtime import distributed
from fnf_jax.runtime import sharding

# The batch sizes each job splits over the mesh's devices (jobs not named here check nothing
# that needs the devices).
BATCHES = {
    "train": ("data.batch_size",),
    "cache": ("data.batch_size",),
    "eval": ("data.batch_size",),
    "demo": ("data.batch_size",),
    "train_reward": ("data.batch_size", "eval.batch_size"),
    "eval_reward": ("data.batch_size", "eval.batch_size"),
}


def check(config) -> dict[str, int] | None:
  """Raises validate.ConfigError for the first batch that does not split over the mesh;
  returns the mesh's shape (None for a job that splits no batch over one)."""
  keys = BATCHES.get(config.job)
  if keys is None:
    return None
  distributed.initialize(config.distributed)
  mesh = sharding.make_mesh(dict(config.mesh))
  for key in keys:  # a sweep's members each see the whole batch (config/sweep.py)
    validate.check_batch(config, sweep.batch_devices(dict(mesh.shape)), key)
  return dict(mesh.shape)
