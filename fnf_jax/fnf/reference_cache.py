"""The reference (Î0, M) of every training example, computed once (the `cache` job, or the first
`train` with `train.reference = "cache"`).

Î0 and M depend only on the frozen model, the prompt and the example's seed, so they need not be
recomputed every step (that halves the FLOPs of a Focus-N-Fix step). The cache lives in
WORKDIR/reference/, in shards of `shard_size` examples in canonical example order. Every process
computes its own rows of each batch and writes them to its own part of the shard:

    fingerprint.txt               what the values depend on; written (by process 0) first
    shard_00000.p000.index.npy    [n] int32     example indices of process 0's rows
    shard_00000.p000.area.npy     [n] float32   mean of each row's mask (data.min_mask_area)
    shard_00000.p000.reference.npy [n, H, W, 3] Î0 in config.cache.dtype
    shard_00000.p000.mask.npy     [n, H, W]     M in config.cache.dtype
    shard_00000.json              the shard's parts; written by process 0 once all are written
    manifest.json                 written last: the cache is complete only when it exists

Plain `.npy` files so that a reader reads only the bytes of the rows it asks for (one `pread` of
each row at its offset: on a gcsfuse bucket, a range request), whatever the batch; each host
reads only its own rows. float32 storage keeps Î == Î0 exact at step 0 (the constraint starts
at exactly 0, as in online mode); float16 halves the disk for a small rounding of Î0.

Part files are written to a temporary name and renamed, and a shard counts as done only once its
`.json` exists, so an interrupted job resumes at the first unfinished shard (with any number of
processes) and never reads a half-written file.
"""

import hashlib
import json
import os

import jax
import numpy as np
from absl import logging

from fnf_jax.runtime import distributed
from fnf_jax.runtime import progress
from fnf_jax.data import batch as batch_lib
from fnf_jax.data import examples as examples_lib

MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.txt"
ARRAYS = ("index", "area", "reference", "mask")


def fingerprint(config, examples: list[examples_lib.Example]) -> str:
  """What the cached values depend on: model, prompts and seeds, sampling and mask settings."""
  # Not objective.mask: the cached M is the reward's region either way (train_step.reference).
  parts = [config.model.path, config.model.dtype, config.reward.to_json(),
           config.sampling.to_json(), config.mask.to_json()]
  parts += [f"{e.index}|{e.seed}|{e.prompt}" for e in examples]
  return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


def directory(workdir: str) -> str:
  return os.path.join(workdir, "reference")


def is_complete(workdir: str) -> bool:
  return os.path.isfile(os.path.join(directory(workdir), MANIFEST))


def _part(k: int, process: int) -> str:
  return f"shard_{k:05d}.p{process:03d}"


def _save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)


def _write_json(path: str, data: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f)
  os.replace(tmp, path)


def _check_fingerprint(out: str, expected: str) -> None:
  """Shards already on disk are reused (an interrupted job resumes), so they must have been
  computed for this config: the fingerprint is recorded before the first shard is written."""
  stamp = os.path.join(out, FINGERPRINT)
  if os.path.exists(stamp):
    with open(stamp) as f:
      found = f.read().strip()
    if found != expected:
      raise ValueError(
          f"{out!r} holds reference shards of another model, prompt set or sampling/mask "
          f"settings (fingerprint {found} != {expected}); nothing was overwritten. Use a fresh "
          "workdir, or delete that folder to recompute it.")
  elif distributed.is_writer():
    with open(stamp + ".tmp", "w") as f:
      f.write(expected + "\n")
    os.replace(stamp + ".tmp", stamp)


def write(workdir: str, config, examples, compute, *, shard_size: int, batch_size: int,
          dtype: str = "float32") -> str:
  """Writes the cache. `compute(batch_examples) -> (indices, reference, mask)` runs one global
  batch (every process calls it with the same examples) and returns the rows this process
  writes, as numpy arrays."""
  out = directory(workdir)
  os.makedirs(out, exist_ok=True)
  expected = fingerprint(config, examples)
  _check_fingerprint(out, expected)
  distributed.barrier("reference-fingerprint")
  me, processes = jax.process_index(), jax.process_count()
  num_shards = -(-len(examples) // shard_size)
  bar = progress.Progress(len(examples), label="reference")
  shards = []
  for k in range(num_shards):
    chunk = examples[k * shard_size:(k + 1) * shard_size]
    done = os.path.join(out, f"shard_{k:05d}.json")
    # Every process sees the same files here: a shard's .json is written only after the
    # barrier that ends it, and read only by later decisions.
    if os.path.exists(done):
      with open(done) as f:
        shards += json.load(f)["parts"]
      bar.update(len(chunk))
      continue
    got = {name: [] for name in ARRAYS}
    for start in range(0, len(chunk), batch_size):
      piece = chunk[start:start + batch_size]
      # The last batch is padded with its last example (a whole global batch for the mesh);
      # the padding rows are dropped below.
      indices, refs, masks = compute(piece + piece[-1:] * (batch_size - len(piece)))
      wanted = {e.index for e in piece}
      keep = np.asarray([i in wanted for i in indices], bool)
      first = np.unique(indices[keep], return_index=True)[1]  # a padded duplicate, once
      rows = np.flatnonzero(keep)[np.sort(first)]
      got["index"].append(np.asarray(indices)[rows].astype(np.int32))
      got["area"].append(np.mean(np.asarray(masks, np.float32)[rows], axis=(1, 2)))
      got["reference"].append(np.asarray(refs)[rows].astype(dtype))
      got["mask"].append(np.asarray(masks)[rows].astype(dtype))
    stem = _part(k, me)
    for name in ARRAYS:
      _save_npy(os.path.join(out, f"{stem}.{name}.npy"), np.concatenate(got[name]))
    distributed.barrier(f"reference-shard-{k}")
    parts = [_part(k, p) for p in range(processes)]
    if distributed.is_writer():
      _write_json(done, {"parts": parts, "num_examples": len(chunk)})
    shards += parts
    bar.update(len(chunk))
  if distributed.is_writer():
    _write_json(os.path.join(out, MANIFEST), {
        "num_examples": len(examples), "shard_size": shard_size, "fingerprint": expected,
        "dtype": dtype, "parts": shards})
  distributed.barrier("reference-manifest")
  logging.info("reference cache complete: %d examples in %s", len(examples), out)
  return out


class _Rows:
  """One `.npy` file read a row at a time (`pread` at the row's offset: only its bytes)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      self.offset = f.tell()
    if fortran:
      raise ValueError(f"{path}: a Fortran-ordered array; the cache writes C order")
    self.shape, self.dtype = shape, np.dtype(dtype)
    self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize

  def read(self, rows) -> np.ndarray:
    out = np.empty((len(rows),) + tuple(self.shape[1:]), self.dtype)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      for j, r in enumerate(rows):
        data = os.pread(fd, self.row_bytes, self.offset + int(r) * self.row_bytes)
        if len(data) != self.row_bytes:
          raise ValueError(f"{self.path}: row {r} is truncated ({len(data)} of "
                           f"{self.row_bytes} bytes); delete WORKDIR/reference and recompute")
        out[j] = np.frombuffer(data, self.dtype).reshape(self.shape[1:])
    finally:
      os.close(fd)
    return out


class Cache:
  """Random access to the cached (Î0, M) by example index; reads only the rows asked for."""

  def __init__(self, workdir: str, config, examples):
    folder = directory(workdir)
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"no complete reference cache at {folder!r} ({MANIFEST} missing). Compute it with the "
          "same config and workdir (`--config.job=cache`, or train with train.reference=cache, "
          "which computes it first), or set --config.train.reference=online.")
    with open(path) as f:
      self.manifest = json.load(f)
    expected = fingerprint(config, examples)
    if self.manifest.get("fingerprint") != expected or "parts" not in self.manifest:
      raise ValueError(
          f"the reference cache in {folder!r} was computed for another model, prompt set or "
          f"sampling/mask settings, or by an older fnf_jax (fingerprint "
          f"{self.manifest.get('fingerprint')} != {expected}). Recompute it with "
          "`--config.job=cache` in a fresh workdir.")
    self.folder = folder
    # The small per-row arrays of every part: where each example is, and its mask's area.
    self._where, self._area = {}, {}
    for part in self.manifest["parts"]:
      index = np.load(os.path.join(folder, f"{part}.index.npy"))
      area = np.load(os.path.join(folder, f"{part}.area.npy"))
      for row, (i, a) in enumerate(zip(index.tolist(), area.tolist())):
        self._where.setdefault(i, (part, row))
        self._area[i] = a
    missing = [e.index for e in examples if e.index not in self._where]
    if missing:
      raise ValueError(f"the reference cache in {folder!r} lacks examples {missing[:5]} "
                       f"({len(missing)} in all); delete that folder and recompute it")
    self._files = {}

  def _file(self, part: str, name: str) -> _Rows:
    key = (part, name)
    if key not in self._files:
      self._files[key] = _Rows(os.path.join(self.folder, f"{part}.{name}.npy"))
    return self._files[key]

  def area(self, index: int) -> float:
    """The mean of example `index`'s mask M (no array is read)."""
    return self._area[int(index)]

  def get(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(Î0 [n, H, W, 3], M [n, H, W]) of the examples, float32, in the order asked."""
    located = [self._where[int(i)] for i in indices]
    out = {}
    for name in ("reference", "mask"):
      rows = [None] * len(located)
      for part in dict.fromkeys(p for p, _ in located):
        js = [j for j, (p, _) in enumerate(located) if p == part]
        values = self._file(part, name).read([located[j][1] for j in js])
        for j, v in zip(js, values):
          rows[j] = v
      out[name] = np.stack(rows).astype(np.float32)
    return out["reference"], out["mask"]


def compute_fn(reference, frozen, pipe, config, *, mesh, rules, reward=None):
  """examples (one global batch) -> (indices, Î0, M) of this process's rows, with the frozen
  model; `reference` is the run's jitted `step.reference` (fnf_jax.fnf.run.Run.reference_fn)."""

  def compute(chunk):
    batch, _ = batch_lib.local_batch(pipe, chunk, config, mesh, rules, reward)
    indices = batch.pop("index")
    ref, mask = reference(frozen, batch)
    return (distributed.local_value(indices), distributed.local_value(ref),
            distributed.local_value(mask))

  return compute
