"""Heatmap reward data for `train_reward` / `eval_reward`: a TFDS dataset read through grain.

A dataset (`data.name`) is a TFDS builder plus the fields that train each head of a model:

    richhf18k     heatmaps  implausibility <- artifact_map, misalignment <- misalignment_map
                  scores    plausibility <- artifact_score, alignment <- misalignment_score,
                            aesthetics <- aesthetics_score, overall <- overall_score
    toy_defects   heatmaps  defect <- defect_map                     (fnf_jax/toy/data.py)

The table of datasets is fnf_jax/data/reward_datasets.py (light: the config check reads it);
packages add theirs there (the toy world does, from its `__init__`). A batch is

    image        uint8 [b, H, W, 3], resized to the model's input (PIL bilinear, antialiased:
                 what ViTImageProcessor does)
    heatmap/<k>  uint8 [b, h, w], the map resized to the model's heatmap size
                 (both stay uint8 until the device: a quarter of float32's bytes between grain's
                 workers and the host, and on the way to the devices; `unit` makes them [0, 1])
    score/<k>    float32 [b]
    prompt       the prompts (host only: the job tokenizes them for the model)
    valid        bool [b]: False on the rows that pad an evaluation's last batch

Order: training batch `step` holds the examples at positions step·B .. step·B + B - 1 of an
endless stream in which each epoch is a permutation of the split drawn from (seed, epoch): a
batch is a function of the step alone, so a resumed run reads exactly what an uninterrupted
one reads, and each process decodes only its own rows of it. grain's worker processes
(`data.workers`) decode batches ahead of the devices.
"""

import dataclasses
import functools
import io

import numpy as np
from PIL import Image



def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if array.shape[:2] == tuple(size):
    return array
  return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))


def _rgb(data) -> np.ndarray:
  if isinstance(data, np.ndarray):  # a dataset that stores pixels (the toy world's)
    return data
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


@dataclasses.dataclass(frozen=True)
class Decode:
  """One record -> one example of the batch layout (module docstring). Picklable: grain's
  workers each get a copy."""

  image_size: tuple[int, int]
  heatmap_size: tuple[int, int]
  heatmaps: tuple[tuple[str, str], ...]  # (head, field)
  scores: tuple[tuple[str, str], ...]

  def __call__(self, record: dict) -> dict:
    out = {"image": _resize(_rgb(record["image"]), self.image_size)}
    for head, field in self.heatmaps:
      out[f"heatmap/{head}"] = _resize(np.asarray(record[field], np.uint8), self.heatmap_size)
    for head, field in self.scores:
      out[f"score/{head}"] = np.float32(record[field])
    prompt = record.get("prompt", b"")
    out["prompt"] = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
    return out


def unit(x):
  """A uint8 image or heatmap of the batch -> float32 in [0, 1] (on the device, in the step)."""
  return x.astype("float32") / 255


def stack(examples: list[dict], valid: list[bool]) -> dict:
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "prompt"}
  batch["prompt"] = [e["prompt"] for e in examples]
  batch["valid"] = np.asarray(valid, bool)
  return batch


@functools.lru_cache(maxsize=4)
def _order(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class TrainBatch:
  """step -> this process's rows of training batch `step` (module docstring)."""

  source: object  # a TFDS data source (random access)
  decode: Decode
  batch_size: int
  rows: tuple[int, ...]
  seed: int

  def __call__(self, step: int) -> dict:
    n = len(self.source)
    examples = []
    for r in self.rows:
      epoch, i = divmod(int(step) * self.batch_size + r, n)
      examples.append(self.decode(self.source[int(_order(n, self.seed, epoch)[i])]))
    return stack(examples, [True] * len(examples))


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  """k -> this process's rows of evaluation batch k: the split in its stored order, the last
  batch padded with copies of its first example (valid = False)."""

  source: object
  decode: Decode
  batch_size: int
  rows: tuple[int, ...]

  def __call__(self, k: int) -> dict:
    n = len(self.source)
    positions = [int(k) * self.batch_size + r for r in self.rows]
    first = min(int(k) * self.batch_size, n - 1)
    return stack([self.decode(self.source[p if p < n else first]) for p in positions],
                 [p < n for p in positions])


def num_eval_batches(n: int, batch_size: int) -> int:
  return -(-n // batch_size)


def stream(fn, indices: range, workers: int):
  """fn(i) for i in `indices`, in order, decoded `workers` processes ahead (0: inline)."""
  import grain  # pylint: disable=import-outside-toplevel
  ds = grain.MapDataset.range(indices.start, indices.stop).map(fn).to_iter_dataset()
  if workers > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (a library caller's case)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds
