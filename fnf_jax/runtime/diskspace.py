"""How much disk a checkpoint save needs, and the check that refuses one that cannot fit.

What a save of fnf_jax.runtime.checkpoint writes (measured with orbax 0.12 / tensorstore OCDBT
on the violence config's CPU variant, 203 arrays, 119,856 bytes of them):
- the arrays, compressed (zstd): a new run's LoRA B and Adam moments are zeros and shrink to
  almost nothing, while trained weights are incompressible floats, which is why a run's
  checkpoints grow (here 390 -> 575 KB from step 1 to step 3). Their uncompressed size, the
  arrays' nbytes, bounds them whatever the training does;
- the small ones twice: each process writes its shards to `state/ocdbt.process_<i>/d/`, then
  the primary merges the databases under `state/d/`, and a chunk of at most 1,024 bytes
  (orbax's max_inline_value_bytes) lives inside the B-tree nodes, which the merge copies. A
  LoRA of rank 4 on the tiny models is all such chunks (2 x 118 KB of data at step 3);
  SD's are larger and stored once;
- metadata of a fixed size for a given tree and mesh: `_METADATA` (each array's tree path),
  `_sharding` (each array's mesh, listing every device), `array_metadatas/process_<i>`,
  the manifests, and the small JSON items (meta, prng, settings): about 1.2 KB an array here,
  more with long names or many devices;
- every file rounded up to the disk's blocks (4 KiB), some 20 files a save.
Measured from the newest complete checkpoint where there is one (everything outside the data
folders), else estimated from the tree; see `needed`. The data files are not the data alone:
they hold the B-tree nodes too, whose number varies with how the writes batch. The same 2-step
run in the full test suite wrote 485 KB of data files at step 2 for its 120 KB of arrays, and
the checkpoint grew from 596 to 808 KiB between steps 1 and 2; so the need is also at least
GROWTH times the newest checkpoint (the runs measured grew by at most 1.36x a save). While a save is written the `keep` older
checkpoints all stay (orbax deletes the oldest only once the new one is complete), so the
free space must hold one whole new checkpoint.
"""

import os
import shutil
from typing import Any

import jax
import numpy as np

from fnf_jax.config import errors

BLOCK = 4096  # the allocation unit files are rounded up to (ext4, tmpfs)
INLINE = 1024  # chunks up to this size are copied by the merge (module docstring)
# Per array: zstd framing and the OCDBT index entry of its chunks (bytes, a generous bound).
PER_ARRAY_DATA = 256
# The data files' last blocks (some 10 files) and what no formula covers.
SLACK = 32 * BLOCK
# A save needs at least this multiple of the newest complete checkpoint (module docstring).
GROWTH = 1.5


class DiskFullError(errors.StopError, OSError):
  """A checkpoint would not fit on the workdir's disk; nothing of it was written."""


def is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _leaf_bytes(x) -> int:
  if is_key(x):  # stored as its raw key data (uint32)
    x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize


def state_bytes(tree: Any) -> int:
  """The uncompressed size of the tree's arrays (arrays or jax.ShapeDtypeStruct leaves)."""
  return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree))


def _chunks(x) -> int:
  """The chunks an array is written in: one per distinct shard."""
  sharding = getattr(x, "sharding", None)
  if sharding is None or is_key(x) or not np.shape(x):
    return 1
  shard = sharding.shard_shape(tuple(np.shape(x)))
  return int(np.prod([-(-n // max(s, 1)) for n, s in zip(np.shape(x), shard)]))


def data_bytes(tree: Any) -> int:
  """The bound on the bytes a save writes for the arrays of `tree`: per chunk its
  uncompressed size, or twice as much as may fit inline (INLINE) where more (a chunk that
  compresses to that size is stored twice), plus PER_ARRAY_DATA per array."""
  total = 0
  for x in jax.tree.leaves(tree):
    chunks = _chunks(x)
    size = _leaf_bytes(x) / chunks
    total += int(chunks * max(size, 2 * min(size, INLINE))) + PER_ARRAY_DATA
  return total


def _devices(x) -> int:
  sharding = getattr(x, "sharding", None)
  return len(sharding.device_set) if sharding is not None else 1


def metadata_bytes(tree: Any) -> int:
  """orbax's metadata for `tree`, estimated from its paths and meshes (no checkpoint yet):
  per array its path about three times (_METADATA, array_metadatas, _sharding's key) with
  ~700 bytes of JSON around them and ~20 bytes per device in its mesh listing; per process an
  array_metadatas file and its own database; each file's last block."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  per_array = sum(4 * len(jax.tree_util.keystr(p)) + 700 + 20 * _devices(x) for p, x in flat)
  processes = jax.process_count()
  return per_array + processes * 4 * BLOCK + 24 * BLOCK


def _allocated(path: str) -> int:
  st = os.stat(path)
  return max(st.st_size, getattr(st, "st_blocks", 0) * 512)


def _allocated_folder(folder: str) -> int:
  try:
    return sum(_allocated(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names)
  except OSError:
    return 0


def measured_metadata(step_folder: str) -> int | None:
  """The bytes a complete checkpoint holds outside its array data (files under a `d/`
  folder), as allocated on its disk; None if it cannot be listed."""
  total = 0
  try:
    for folder, _, names in os.walk(step_folder):
      if os.path.basename(folder) == "d":
        continue
      total += sum(_allocated(os.path.join(folder, n)) for n in names)
  except OSError:
    return None
  return total or None


def needed(tree: Any, newest: str | None = None) -> int:
  """Bytes a save of `tree` may write: `data_bytes` (the bound on every later checkpoint's
  data, however the weights compress) and the metadata measured on `newest` (the newest complete
  checkpoint's folder; the same tree and mesh write the same) or estimated, but at least GROWTH
  times `newest`; plus SLACK."""
  meta = measured_metadata(newest) if newest else None
  formula = data_bytes(tree) + (meta if meta is not None else metadata_bytes(tree))
  previous = _allocated_folder(newest) if newest else 0
  return max(formula, int(GROWTH * previous)) + SLACK


def check(directory: str, tree: Any, steps, *, keep: int, doing: str) -> int:
  """Raises DiskFullError when `directory`'s disk cannot hold the next save of `tree`: one
  message naming the folder, the bytes free and needed. `steps`: its complete checkpoints;
  `doing`: what is not done ("saving", "starting"). Returns the bytes needed."""
  if "://" in directory:
    return 0  # a bucket: no free-space figure
  done = [s for s in steps if os.path.isdir(os.path.join(directory, str(s)))]
  newest = os.path.join(directory, str(max(done))) if done else None
  need = needed(tree, newest)
  os.makedirs(directory, exist_ok=True)
  free = shutil.disk_usage(directory).free
  if free < need:
    raise DiskFullError(
        f"{directory}: {free:,} bytes free, a checkpoint needs about {need:,}; not {doing} "
        f"(the earlier checkpoints are intact; newest: "
        f"{f'step {max(done)}' if done else 'none yet'}). That is the state's "
        f"{state_bytes(tree):,} bytes of arrays uncompressed, the small ones twice, and "
        f"orbax's metadata; the {keep} kept stay until it is complete. Free space or move the workdir, then run the same "
        "command again to resume")
  return need
