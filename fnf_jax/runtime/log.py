"""Training metrics: a JSONL log (greppable, plottable without TensorBoard), TensorBoard scalars
and image panels via tensorboardX (no TensorFlow), the console line, and config.json.

Only process 0 writes, so multi-host runs produce one log; other processes get no-op writers.
"""

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from fnf_jax.runtime.progress import format_seconds

# The console line's fixed, compact set (in this order, when present); everything goes to files.
CONSOLE_KEYS = ("loss", "reward", "constraint", "change_outside", "mask_area")


def _float(name: str, value: Any) -> float:
  try:
    return float(np.asarray(jax.device_get(value)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"metric {name!r} must be a scalar number, got {value!r}") from e


class MetricWriter:
  """`workdir/metrics.jsonl` (one {"step", "time", name: value} line per call, flushed at once so
  a crash loses nothing) and TensorBoard events under `workdir/tensorboard/`."""

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               resume_step: int | None = None):
    """`resume_step`: the step a resumed run restarts from; rows of later steps (logged by the
    interrupted run after its last checkpoint, and about to be logged again) are dropped, so
    each step has one row."""
    self.workdir = os.fspath(workdir)
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    path = os.path.join(self.workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      _truncate_after(path, resume_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), flush_secs=30)

  def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {str(k): _float(str(k), v) for k, v in metrics.items()}
    for reserved in ("step", "time"):
      if reserved in values:
        raise ValueError(f"metric name {reserved!r} is reserved in metrics.jsonl; rename it")
    record = {"step": int(step), "time": round(time.time(), 3), **values}
    # NaN/inf are written as JSON's NaN/Infinity (Python's json reads them back).
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def images(self, step: int, name: str, images: Any) -> None:
    """One TensorBoard image (the batch tiled in a grid) from [N, H, W, 3] in [0, 1] or uint8."""
    if not self.enabled or self._tb is None:
      return
    array = to_uint8(images, name)
    self._tb.add_images(name, array, int(step), dataformats="NHWC")

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _truncate_after(path: str, step: int) -> None:
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a kill mid-write
  if len(kept) != len(lines):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def last_row(workdir: str | os.PathLike) -> dict:
  """The newest metrics.jsonl row without step and time ({} when there is none)."""
  path = os.path.join(os.fspath(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    rows = [line for line in f if line.strip()]
  for line in reversed(rows):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    return {k: v for k, v in row.items() if k not in ("step", "time")}
  return {}


def _images(images: Any, name: str) -> np.ndarray:
  array = np.asarray(jax.device_get(images))
  if array.ndim != 4 or array.shape[-1] != 3:
    raise ValueError(f"{name}: expected [N, H, W, 3] images, got shape {array.shape}")
  return array


def to_uint8(images: Any, name: str = "images") -> np.ndarray:
  """[N, H, W, 3] float in [0, 1] (clipped) or uint8 -> uint8."""
  array = _images(images, name)
  if array.dtype == np.uint8:
    return array
  return (np.clip(array.astype(np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _unit(images: Any, name: str) -> np.ndarray:
  """[N, H, W, 3] float in [0, 1] (clipped) or uint8 -> float32 in [0, 1]."""
  array = _images(images, name)
  if array.dtype == np.uint8:
    return array.astype(np.float32) / 255
  return np.clip(array.astype(np.float32), 0.0, 1.0)


OVERLAY_COLOR = np.array([1.0, 0.0, 0.0], np.float32)
OVERLAY_ALPHA = 0.5


def panel(reference: Any, mask: Any, images: Any) -> np.ndarray:
  """[N, H, 3W, 3] float32 in [0, 1]: `Î0 | Î0 tinted red where M = 1 | Î` per example.

  reference, images: [N, H, W, 3] in [0, 1] (or uint8); mask: [N, H, W] (or [N, H, W, 1]) in
  [0, 1], the region the reward may change. A soft mask tints proportionally.
  """
  ref, out = _unit(reference, "reference"), _unit(images, "images")
  m = np.asarray(jax.device_get(mask), np.float32)
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  if ref.shape != out.shape or m.shape != ref.shape[:3]:
    raise ValueError(f"panel: reference {ref.shape}, mask {m.shape} and images {out.shape} must "
                     "be [N, H, W, 3], [N, H, W] and [N, H, W, 3] with the same N, H, W")
  w = OVERLAY_ALPHA * np.clip(m, 0.0, 1.0)[..., None]
  overlay = (1 - w) * ref + w * OVERLAY_COLOR
  return np.concatenate([ref, overlay, out], axis=2)


def _gray_rgb(heat: Any, size: tuple[int, int]) -> np.ndarray:
  """[N, h, w] in [0, 1] -> [N, H, W, 3] gray, nearest-neighbour scaled to `size`."""
  h = np.clip(np.asarray(jax.device_get(heat), np.float32), 0.0, 1.0)
  rows = (np.arange(size[0]) * h.shape[1]) // size[0]
  cols = (np.arange(size[1]) * h.shape[2]) // size[1]
  return np.repeat(h[:, rows][:, :, cols][..., None], 3, axis=-1)


def heatmap_panel(images: Any, true: Any, predicted: Any) -> np.ndarray:
  """[N, H, 3W, 3] float32 in [0, 1]: `image | true heatmap | predicted heatmap` per example
  (heatmaps [N, h, w] in [0, 1], shown in gray at the image's size)."""
  im = _unit(images, "images")
  return np.concatenate([im, _gray_rgb(true, im.shape[1:3]), _gray_rgb(predicted, im.shape[1:3])],
                        axis=2)


def console_line(step: int, total: int, metrics: Mapping[str, Any], images_per_second: float,
                 eta_seconds: float) -> str:
  """`step 12/200  loss 0.123  reward -0.456  constraint 0.01  3.2 img/s  ETA 0:01:02`.

  Shows CONSOLE_KEYS that are present (3 significant digits); the rest is in the files.
  """
  parts = [f"step {int(step)}/{int(total)}"]
  for key in CONSOLE_KEYS:
    # A sweep logs "loss/beta=0.1" etc. (runtime/loop.py): each member's, in order.
    shown = [k for k in metrics if k == key or k.startswith(key + "/")]
    if shown:
      parts.append(f"{key} " + " ".join(f"{_float(k, metrics[k]):.3g}" for k in shown))
  rate = float(images_per_second)
  parts.append(f"{rate:.1f} img/s" if math.isfinite(rate) else "? img/s")
  eta = float(eta_seconds)
  parts.append(f"ETA {format_seconds(eta) if math.isfinite(eta) else '?'}")
  return "  ".join(parts)


def write_config(workdir: str | os.PathLike, config: Any) -> str:
  """Writes `config` (ml_collections ConfigDict, or a plain mapping) to workdir/config.json.

  Only process 0 writes; returns the path. Values JSON cannot hold (callables, tuples of
  objects...) are written as their best-effort string form rather than failing the run.
  """
  path = os.path.join(os.fspath(workdir), "config.json")
  if jax.process_index() != 0:
    return path
  os.makedirs(os.fspath(workdir), exist_ok=True)
  if hasattr(config, "to_json_best_effort"):
    text = config.to_json_best_effort(indent=2, sort_keys=True)
  else:
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=repr)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return path
