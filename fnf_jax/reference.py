"""The reference (Î0, M) of every training example, computed once by the `cache` job.

Î0 and M depend only on the frozen model, the prompt and the example's seed, so they need not be
recomputed every step (that halves the FLOPs of a Focus-N-Fix step). The cache lives in
WORKDIR/reference/ as shards of `shard_size` examples in canonical example order:

    shard_00000.npz   {"index": [n], "reference": [n, H, W, 3], "mask": [n, H, W]}

stored in config.cache.dtype: float32 keeps Î == Î0 exact at step 0 (the constraint starts at
exactly 0, as in online mode); float16 halves the disk for a small rounding of Î0.
    manifest.json     written last: the cache is complete only when it exists

Shards are written to a temporary name and renamed, so an interrupted job resumes where it
stopped and never leaves a half-written shard behind.
"""

import hashlib
import json
import os

import jax
import numpy as np
from absl import logging

from fnf_jax import progress
from fnf_jax.data import examples as examples_lib

MANIFEST = "manifest.json"


def fingerprint(config, examples: list[examples_lib.Example]) -> str:
  """What the cached values depend on: model, prompts and seeds, sampling and mask settings."""
  # Not objective.mask: the cached M is the reward's region either way (train_step.reference).
  parts = [config.model.path, config.model.dtype, config.reward.to_json(),
           config.sampling.to_json(), config.mask.to_json()]
  parts += [f"{e.index}|{e.seed}|{e.prompt}" for e in examples]
  return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


def directory(workdir: str) -> str:
  return os.path.join(workdir, "reference")


def write(workdir: str, config, examples, compute, *, shard_size: int, batch_size: int,
          dtype: str = "float32") -> str:
  """Computes `compute(examples) -> (reference, mask)` for every example, shard by shard."""
  out = directory(workdir)
  os.makedirs(out, exist_ok=True)
  # Shards already on disk are reused (an interrupted cache job resumes), so they must have been
  # computed for this config: the fingerprint is recorded before the first shard is written.
  expected = fingerprint(config, examples)
  stamp = os.path.join(out, "fingerprint.txt")
  if os.path.exists(stamp):
    with open(stamp) as f:
      found = f.read().strip()
    if found != expected:
      raise ValueError(
          f"{out!r} holds reference shards of another model, prompt set or sampling/mask "
          f"settings (fingerprint {found} != {expected}); nothing was overwritten. Use a fresh "
          "workdir, or delete that folder to recompute it.")
  else:
    with open(stamp, "w") as f:
      f.write(expected + "\n")
  num_shards = -(-len(examples) // shard_size)
  bar = progress.Progress(len(examples), label="reference")
  for k in range(num_shards):
    chunk = examples[k * shard_size:(k + 1) * shard_size]
    path = os.path.join(out, f"shard_{k:05d}.npz")
    if not os.path.exists(path):
      refs, masks = [], []
      for start in range(0, len(chunk), batch_size):
        r, m = compute(chunk[start:start + batch_size])
        refs.append(np.asarray(r, dtype))
        masks.append(np.asarray(m, dtype))
      tmp = path + ".tmp.npz"
      np.savez(tmp, index=np.asarray([e.index for e in chunk], np.int32),
               reference=np.concatenate(refs), mask=np.concatenate(masks))
      os.replace(tmp, path)
    bar.update(len(chunk))
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump({"num_examples": len(examples), "shard_size": shard_size,
               "fingerprint": expected}, f)
  logging.info("reference cache complete: %d examples in %s", len(examples), out)
  return out


class Cache:
  """Random access to the cached (Î0, M) by example index."""

  def __init__(self, workdir: str, config, examples):
    folder = directory(workdir)
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"no complete reference cache at {folder!r} ({MANIFEST} missing). Compute it first "
          "with the same config and workdir and `--config.job=cache`, or set "
          "--config.train.reference=online.")
    with open(path) as f:
      self.manifest = json.load(f)
    expected = fingerprint(config, examples)
    if self.manifest["fingerprint"] != expected:
      raise ValueError(
          f"the reference cache in {folder!r} was computed for another model, prompt set or "
          f"sampling/mask settings (fingerprint {self.manifest['fingerprint']} != {expected}). "
          "Recompute it with `--config.job=cache` in a fresh workdir.")
    self.folder, self._shard, self._data = folder, None, None

  def _load(self, k: int):
    if self._shard != k:
      with np.load(os.path.join(self.folder, f"shard_{k:05d}.npz")) as z:
        self._data = {name: z[name] for name in z.files}
      self._shard = k
    return self._data

  def get(self, indices) -> tuple[np.ndarray, np.ndarray]:
    size = self.manifest["shard_size"]
    refs, masks = [], []
    for i in map(int, indices):
      data = self._load(i // size)
      refs.append(data["reference"][i % size])
      masks.append(data["mask"][i % size])
    return np.stack(refs).astype(np.float32), np.stack(masks).astype(np.float32)


def compute_fn(reference, frozen, pipe, config):
  """examples -> (Î0, M) with the frozen model; `reference` is the run's jitted
  `step.reference` (fnf_jax.train.Run.reference_fn)."""

  def compute(chunk):
    batch = examples_lib.host_batch(pipe, chunk, negative_prompt=config.sampling.negative_prompt,
                                    num_steps=config.sampling.num_steps, eta=config.sampling.eta)
    batch.pop("index")
    return jax.device_get(reference(frozen, batch))

  return compute
