"""Several processes: starting JAX's multi-process runtime, and what each process reads and writes.

Every process runs the same command (`--config.distributed.enabled=True`); they find each other
through `config.distributed` or, with its fields left empty, through the cluster's environment
(TPU pod slices, GKE TPU jobs, SLURM, Open MPI), which `jax.distributed.initialize` reads.

The rules that hold across the package:
- input is per host: each process builds and reads only the batch rows its devices hold
  (`local_rows`, `global_batch`);
- one writer per file: process 0 writes the config, metrics, TensorBoard events, the LoRA
  export and the reference cache's manifest; each process writes only its own cache rows; orbax
  writes each process's array shards. A reader of another process's file waits at a `barrier`.
"""

import os

import jax
import numpy as np
from absl import logging

from fnf_jax.config import validate

# The environment variables JAX reads to find a cluster on its own, by kind (for the message
# when none is there).
CLUSTER_VARIABLES = {
    "GKE TPU": "TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES)",
    "SLURM": "SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID",
    "Open MPI": "OMPI_MCA_orte_hnp_uri",
    "any": "JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID)",
}


def _detectable() -> bool:
  """Whether jax.distributed.initialize() can find the cluster without arguments."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top  # jax's own detection
    kinds = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
    return any(not getattr(k, "opt_in_only_method", False) and k.is_env_present() for k in kinds)
  except Exception:  # pylint: disable=broad-except  # another jax: let initialize decide
    return True


_started = False


def initialize(d) -> None:
  """Starts the multi-process runtime once, before any other JAX use (no-op when disabled, or
  when this process has started it already: the training job does so before taking its lock)."""
  global _started
  if not d.enabled or _started:
    return
  # validate.distributed has checked the fields by hand; what is left is the environment.
  explicit = validate.distributed_explicit(d)
  if not explicit and not _detectable():
    raise validate.ConfigError(
        "config.distributed.enabled = True, but no coordinator is configured and this machine is "
        "in no cluster JAX detects. Set --config.distributed.coordinator=HOST:PORT "
        "--config.distributed.num_processes=N --config.distributed.process_id=I, or run where "
        "the cluster's variables are set: " + "; ".join(f"{k}: {v}"
                                                        for k, v in CLUSTER_VARIABLES.items()))
  # Multi-process CPU runs (tests, CPU clusters) need CPU collectives; gloo ships with jaxlib.
  # The setting only concerns the CPU client, so it is harmless on TPUs and GPUs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(d.coordinator, num_processes=d.num_processes,
                               process_id=d.process_id)
  else:
    jax.distributed.initialize()
  _started = True
  logging.info("process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_writer() -> bool:
  """The one process that writes shared files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def local_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...], axis: int = 0) -> range:
  """The rows along `axis` of a global array of `shape` that this process's devices hold.

  They must be one contiguous block (the mesh lists each process's devices together, as
  jax.make_mesh does), which is what `jax.make_array_from_process_local_data` assembles.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    rows.update(range(*index[axis].indices(shape[axis])))
  block = range(min(rows), max(rows) + 1)
  if len(block) != len(rows):
    raise ValueError(f"this process holds rows {sorted(rows)} of the batch axis: not one block; "
                     "order the mesh's devices by process")
  return block


def global_batch(local: dict, shardings: dict, global_size: int, axes: dict) -> dict:
  """Process-local rows (`local[k]` holds this process's rows on axis `axes[k]`) -> global
  jax.Arrays of `global_size` rows, sharded by `shardings`."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    shape = list(v.shape)
    shape[axes[k]] = global_size
    out[k] = jax.make_array_from_process_local_data(shardings[k], v, tuple(shape))
  return out


def local_value(x: jax.Array, axis: int = 0) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order (replicas counted once)."""
  pieces = {}
  for shard in x.addressable_shards:
    start = shard.index[axis].indices(x.shape[axis])[0] if x.ndim else 0
    pieces.setdefault(start, shard.data)
  return np.concatenate([np.asarray(pieces[s]) for s in sorted(pieces)], axis=axis)


def gather(x) -> np.ndarray:
  """The whole of a global array on this host (all processes must call it together)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))
