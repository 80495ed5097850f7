"""The training batch's layout across processes and devices.

A global batch of examples is split by rows over the mesh's data axes; each process builds only
its own rows on the host (`host_rows`) and `to_global` makes them one jax.Array per input.
Token ids [E, B, 77] and sampler noise [S, B, ...] carry the batch on axis 1, everything else
on axis 0.
"""

import jax
import numpy as np

from fnf_jax.data import examples as examples_lib
from fnf_jax.runtime import distributed
from fnf_jax.runtime import sharding


def batch_axis(key: str) -> int:
  """The batch axis of a step input: token ids [E, B, 77] and noise [S, B, ...] on axis 1."""
  return 1 if key in ("ids", "neg_ids", "noise") else 0


def batch_shardings(batch: dict, mesh, rules) -> dict:
  return {k: sharding.batch_sharding(mesh, np.ndim(v), rules, axis=batch_axis(k))
          for k, v in batch.items()}


def local_rows(size: int, mesh, rules) -> range:
  """The rows of a global batch of `size` that this process's devices hold (all of them with
  one process)."""
  return distributed.local_rows(sharding.batch_sharding(mesh, 1, rules), (size,))


def host_rows(pipe, examples: list, config, rows: range, cached=None, reward=None) -> dict:
  """This process's rows of the global batch `examples`, as numpy arrays: tokens, x_T (and
  sampler noise), and with a cache its Î0 and M, read for these rows only."""
  s = config.sampling
  batch = examples_lib.host_batch(pipe, examples[rows.start:rows.stop],
                                  negative_prompt=s.negative_prompt, num_steps=s.num_steps,
                                  eta=s.eta, reward=reward)
  if cached is not None:
    batch["reference"], batch["mask"] = cached.get(batch["index"])
  return batch


def to_global(host: dict, shardings: dict, size: int) -> dict:
  """Each process's rows (`host_rows`) -> the global batch of `size` rows as jax.Arrays."""
  return distributed.global_batch(host, shardings, size, {k: batch_axis(k) for k in host})


def local_batch(pipe, examples: list, config, mesh, rules, reward=None) -> tuple[dict, dict]:
  """(global batch, its shardings) of the examples, each process building only its rows."""
  host = host_rows(pipe, examples, config, local_rows(len(examples), mesh, rules),
                   reward=reward)
  shardings = batch_shardings(host, mesh, rules)
  return to_global(host, shardings, len(examples)), shardings


def global_spec(host: dict, shardings: dict, size: int) -> dict:
  """The abstract global batch (shapes, dtypes, shardings) of one process's host rows."""
  return {k: jax.ShapeDtypeStruct(_with(np.shape(v), batch_axis(k), size), v.dtype,
                                  sharding=shardings[k]) for k, v in host.items()}


def _with(shape: tuple, axis: int, size: int) -> tuple:
  return tuple(size if i == axis else d for i, d in enumerate(shape))
