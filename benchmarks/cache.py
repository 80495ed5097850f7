"""Reading the reference cache: random batches from a 2,048-example cache at 512², this version's
per-row `.npy` parts against the `.npz` shards of fnf_jax before it, in one run.

  python benchmarks/cache.py                 # 2,048 examples, float32 (16 GiB of disk, both)
  python benchmarks/cache.py --examples 64   # a quick look

Both caches hold the same random values (no model is needed). Each draws `--batches` random
batches of 8 examples, as the training feed does (a fresh permutation each epoch), and reports
the time per batch and the bytes the process read, from its read counters in /proc/self/io:
`rchar` (every byte read() returned, page cache or not: what a gcsfuse mount fetches) and
`read_bytes` (what reached the disk). The page cache is dropped for the files first
(posix_fadvise DONTNEED), so that `read_bytes` counts cold reads.

The `.npz` reader is the one fnf_jax had up to this version: one shard of `shard_size` examples
held in memory, any example of another shard loads that whole shard.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import violence  # noqa: E402  (configs/)
from fnf_jax.fnf import reference_cache as reference  # noqa: E402
from fnf_jax.data import examples as examples_lib  # noqa: E402

BATCH = 8


def counters() -> dict:
  with open("/proc/self/io") as f:
    return {k: int(v) for k, v in (line.split(": ") for line in f)}


def drop_page_cache(folder: str) -> None:
  for name in os.listdir(folder):
    fd = os.open(os.path.join(folder, name), os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def values(indices, size):
  """Deterministic random (Î0, M) of the examples (the same in both caches)."""
  rng = np.random.default_rng(int(indices[0]))
  return (rng.random((len(indices), size, size, 3), np.float32),
          rng.random((len(indices), size, size), np.float32))


class NpzShards:
  """The cache format and reader before this version (the peer)."""

  def __init__(self, folder, shard_size):
    self.folder, self.shard_size, self._shard, self._data = folder, shard_size, None, None

  def write(self, n, size, batch):
    for k in range(-(-n // self.shard_size)):
      idx = np.arange(k * self.shard_size, min(n, (k + 1) * self.shard_size))
      refs, masks = zip(*(values(idx[s:s + batch], size) for s in range(0, len(idx), batch)))
      np.savez(os.path.join(self.folder, f"shard_{k:05d}.npz"), index=idx.astype(np.int32),
               reference=np.concatenate(refs), mask=np.concatenate(masks))

  def get(self, indices):
    refs, masks = [], []
    for i in map(int, indices):
      k = i // self.shard_size
      if self._shard != k:
        with np.load(os.path.join(self.folder, f"shard_{k:05d}.npz")) as z:
          self._data = {name: z[name] for name in z.files}
        self._shard = k
      refs.append(self._data["reference"][i % self.shard_size])
      masks.append(self._data["mask"][i % self.shard_size])
    return np.stack(refs), np.stack(masks)


def measure(name, cache, batches, folder, returned_bytes):
  drop_page_cache(folder)
  before, tic = counters(), time.perf_counter()
  for b in batches:
    ref, mask = cache.get(b)
    assert ref.shape[0] == mask.shape[0] == len(b)
  seconds, after = time.perf_counter() - tic, counters()
  rchar, disk = after["rchar"] - before["rchar"], after["read_bytes"] - before["read_bytes"]
  mib = 2**20
  print(f"| {name} | {1e3 * seconds / len(batches):.1f} | {rchar / len(batches) / mib:.1f} | "
        f"{disk / len(batches) / mib:.1f} | {returned_bytes / mib:.1f} | "
        f"{rchar / len(batches) / returned_bytes:.2f}× |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--examples", type=int, default=2048)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--shard_size", type=int, default=256)
  p.add_argument("--batches", type=int, default=32)
  p.add_argument("--dir", default=None, help="where to write the two caches (default: a temp dir)")
  args = p.parse_args()
  root = tempfile.mkdtemp(prefix="fnf_cache_bench_", dir=args.dir)
  try:
    config = violence.get_config("runlocal")
    examples = examples_lib.make_examples([f"prompt {i}" for i in range(args.examples)], 1, 0)
    tic = time.perf_counter()
    reference.write(os.path.join(root, "new"), config, examples,
                    lambda chunk: (np.asarray([e.index for e in chunk]),
                                   *values([e.index for e in chunk], args.size)),
                    shard_size=args.shard_size, batch_size=BATCH)
    new_write = time.perf_counter() - tic
    old_dir = os.path.join(root, "old")
    os.makedirs(old_dir)
    old = NpzShards(old_dir, args.shard_size)
    tic = time.perf_counter()
    old.write(args.examples, args.size, BATCH)
    old_write = time.perf_counter() - tic
    new = reference.Cache(os.path.join(root, "new"), config, examples)

    feed = examples_lib.Feed(examples, BATCH, shuffle_seed=0)
    batches = [[e.index for e in feed.batch_at(i * BATCH)] for i in range(args.batches)]
    for b in batches[:2]:  # same values in both
      for x, y in zip(new.get(b), old.get(b)):
        np.testing.assert_array_equal(x, y)
    old = NpzShards(old_dir, args.shard_size)  # fresh readers
    new = reference.Cache(os.path.join(root, "new"), config, examples)
    returned = BATCH * args.size * args.size * 4 * 4  # Î0 (3 channels) + M, float32
    gib = args.examples * args.size ** 2 * 16 / 2**30
    print(f"{args.examples} examples at {args.size}², float32 ({gib:.1f} GiB per cache), shards "
          f"of {args.shard_size}; {args.batches} random batches of {BATCH}; written in "
          f"{new_write:.0f} s (.npy parts) and {old_write:.0f} s (.npz)\n")
    print("| cache | ms / batch | MiB read / batch (rchar) | MiB from disk / batch | MiB "
          "returned / batch | read / returned |")
    print("|---|---|---|---|---|---|")
    measure("`.npy` parts, per-row pread (this version)", new, batches,
            os.path.join(root, "new", "reference"), returned)
    measure("`.npz` shards (before)", old, batches, old_dir, returned)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
