"""MetricWriter (JSONL + TensorBoard events), the image panel, the console line, config.json."""

import glob
import json
import os
import struct

import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from fnf_jax.runtime import log as metrics


def _read_events(logdir):
  """Events of every tfevents file under logdir, parsing the TFRecord framing by hand:
  u64 length, u32 masked crc32c(length), data, u32 masked crc32c(data)."""
  from tensorboardX.record_writer import masked_crc32c
  events = []
  for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
    with open(path, "rb") as f:
      blob = f.read()
    pos = 0
    while pos < len(blob):
      header = blob[pos:pos + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", blob[pos + 8:pos + 12])[0] == masked_crc32c(header)
      data = blob[pos + 12:pos + 12 + length]
      (data_crc,) = struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])
      assert data_crc == masked_crc32c(data)
      pos += 16 + length
      events.append(event_pb2.Event.FromString(data))
  return events


def test_scalars_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricWriter(tmp_path) as w:
    w.scalars(1, {"loss": np.float32(0.5), "reward": -1})
    w.scalars(2, {"loss": 0.25})
    with pytest.raises(ValueError, match="'step' is reserved"):
      w.scalars(3, {"step": 1.0})
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
      w.scalars(3, {"loss": "high"})
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(l["step"], l["loss"]) for l in lines] == [(1, 0.5), (2, 0.25)]
  assert lines[0]["reward"] == -1.0 and isinstance(lines[0]["time"], float)

  events = _read_events(tmp_path / "tensorboard")
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value
             if v.HasField("simple_value")]
  assert sorted(scalars) == [(1, "loss", 0.5), (1, "reward", -1.0), (2, "loss", 0.25)]


def test_images_written_to_tensorboard(tmp_path):
  with metrics.MetricWriter(tmp_path) as w:
    w.images(4, "samples/panel", np.full((2, 4, 12, 3), 0.5, np.float32))
    w.images(5, "samples/uint8", np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"expected \[N, H, W, 3\].*\(4, 4, 3\)"):
      w.images(6, "bad", np.zeros((4, 4, 3)))
  images = {(e.step, v.tag): v.image for e in _read_events(tmp_path / "tensorboard")
            for v in e.summary.value if v.HasField("image")}
  assert set(images) == {(4, "samples/panel"), (5, "samples/uint8")}
  assert images[(4, "samples/panel")].encoded_image_string[:4] == b"\x89PNG"


def test_jsonl_only_without_tensorboard(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as w:
    w.scalars(0, {"loss": 1.0})
    w.images(0, "x", np.zeros((1, 2, 2, 3)))
  assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


def test_panel_shape_and_overlay_colour():
  n, h, w = 2, 3, 4
  reference = np.full((n, h, w, 3), 0.5, np.float32)
  images = np.full((n, h, w, 3), 0.25, np.float32)
  mask = np.zeros((n, h, w), np.float32)
  mask[:, :, :2] = 1.0
  out = metrics.panel(reference, mask, images)
  assert out.shape == (n, h, 3 * w, 3)
  np.testing.assert_allclose(out[:, :, :w], reference)
  np.testing.assert_allclose(out[:, :, 2 * w:], images)
  overlay = out[:, :, w:2 * w]
  np.testing.assert_allclose(overlay[:, :, 2:], reference[:, :, 2:])  # unmasked: unchanged
  np.testing.assert_allclose(overlay[0, 0, 0], [0.75, 0.25, 0.25])  # masked: half-way to red
  # uint8 inputs and [N, H, W, 1] masks are accepted too
  as_u8 = metrics.panel((reference * 255).astype(np.uint8), mask[..., None], images)
  np.testing.assert_allclose(as_u8, out, atol=1 / 255)
  with pytest.raises(ValueError, match="panel: reference"):
    metrics.panel(reference, mask[:, :2], images)


def test_console_line():
  line = metrics.console_line(12, 200, {"loss": 0.1234, "reward": -0.4561, "constraint": 0.01,
                                        "grad_norm": 3.0, "mask_area": 0.25},
                              images_per_second=3.21, eta_seconds=62)
  assert line == ("step 12/200  loss 0.123  reward -0.456  constraint 0.01  mask_area 0.25  "
                  "3.2 img/s  ETA 0:01:02")
  assert metrics.console_line(0, 5, {}, float("nan"), float("nan")) == "step 0/5  ? img/s  ETA ?"


def test_write_config(tmp_path):
  cfg = ml_collections.ConfigDict({"name": "tiny", "optim": {"lr": 1e-4, "betas": (0.9, 0.99)}})
  path = metrics.write_config(tmp_path / "run", cfg)
  assert json.loads(open(path).read()) == {"name": "tiny",
                                           "optim": {"lr": 1e-4, "betas": [0.9, 0.99]}}
  path = metrics.write_config(tmp_path / "plain", {"a": 1})
  assert json.loads(open(path).read()) == {"a": 1}
