"""A mini RichHF-18K on disk, written without TensorFlow, for the data tests.

`write_mini_richhf(root)` writes `root/{train,dev,test}.tfrecord` in RichHF-18K's schema (one
tf.train.Example per image: `filename`; `aesthetics_score`, `artifact_score`,
`misalignment_score`, `overall_score` (float_list of 1, higher is better); `artifact_map`,
`misalignment_map` (single-channel PNGs, 0-255; 512x512 in the real data, `map_size` here);
`prompt_misalignment_label` (b"1 0 1 ...", one 0/1 per prompt token, 0 = misaligned)), plus
`root/images/<filename>`, RGB PNGs (noise with the two maps painted in) standing in for the Pick-a-Pic v1 images the records
name.

RichHF-18K holds no prompt text: captions come from Pick-a-Pic's `caption` column, joined on the
image uid (the stem of `filename`). `root/prompts.json` (filename -> caption) stands in for that
column. Tokens are RichHF's (google-research richhf_18k/match_label_to_token.py): the caption
split on any of `,.?!":; ` with empty pieces dropped; see `richhf_tokens`.

Filenames look like "train/<uuid>.png": RichHF's train and dev images come from Pick-a-Pic's
train split, its test images from Pick-a-Pic's test split (the prefix is this fixture's choice).

The train split also holds two bad records: one whose image file is absent ("missing_image") and
one whose `artifact_map` is not a PNG ("bad_artifact_map"). Every other record is good.
"""

import io
import json
import os
import re
import uuid

import numpy as np
from PIL import Image

from fnf_jax.data import tfrecord

SCORES = ("aesthetics_score", "artifact_score", "misalignment_score", "overall_score")
MAPS = ("artifact_map", "misalignment_map")
FEATURES = ("filename",) + SCORES + MAPS + ("prompt_misalignment_label",)
WORDS = ("a", "the", "cat", "dog", "red", "blue", "photo", "of", "painting", "woman", "holding",
         "sign", "that", "says", "hello", "castle", "on", "hill", "at", "sunset", "8k", "detailed")
_DELIMS = re.compile("|".join(map(re.escape, ',.?!":; ')))


def richhf_tokens(prompt: str) -> list[str]:
  """RichHF-18K's tokens of a prompt: one misalignment label each."""
  return [t for t in _DELIMS.split(prompt) if t]


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _heatmap(rng, size: int) -> np.ndarray:
  """Mostly zero, with a few soft blobs, like a human-annotated heatmap."""
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  out = np.zeros((size, size), np.float32)
  for _ in range(rng.integers(0, 3)):
    cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 16, size / 4)]
    out = np.maximum(out, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
  return np.round(out * 255).astype(np.uint8)


def _image(rng, size: int, maps: dict) -> np.ndarray:
  """Dim noise with the maps painted in (artifacts red, misalignment green), so that a model
  can learn to find them: what the train_reward tests need to show learning."""
  pixels = rng.uniform(0, 96, (size, size, 3))
  for channel, name in ((0, "artifact_map"), (1, "misalignment_map")):
    heat = np.asarray(Image.fromarray(maps[name]).resize((size, size), Image.BILINEAR))
    pixels[..., channel] += heat * (159 / 255)
  return np.round(pixels).astype(np.uint8)


def _prompt(rng) -> str:
  words = [str(w) for w in rng.choice(WORDS, size=rng.integers(2, 12))]
  for i in range(1, len(words)):  # some punctuation: RichHF's tokenizer splits on it
    if rng.random() < 0.2:
      words[i - 1] += str(rng.choice([",", ".", ";", "!"]))
  return " ".join(words) + ("." if rng.random() < 0.5 else "")


def write_mini_richhf(root, n_train: int = 24, n_dev: int = 6, n_test: int = 6, seed: int = 0,
                      image_size: int = 64, map_size: int = 64) -> dict:
  """Writes the mini dataset under `root`; returns its manifest:

  {"root", "prompts_path", "images_dir", "map_size", "image_size",
   "splits": {split: {"path", "records": [record, ...]}},   # in file order
   "bad": [{"split", "index", "filename", "reason"}, ...]}
  where a record is {"index", "filename", "prompt", "tokens", "label" (list of 0/1), "scores"
  ({name: float32 value}), "artifact_map", "misalignment_map" (uint8 arrays; None when not a
  PNG), "image_path", "bad" (None, "missing_image" or "bad_artifact_map")}.
  `n_train` counts every record in train.tfrecord, the two bad ones included.
  """
  if n_train < 3:
    raise ValueError("n_train must be at least 3 (two of its records are bad)")
  rng = np.random.default_rng(seed)
  root = os.fspath(root)
  images_dir = os.path.join(root, "images")
  os.makedirs(images_dir, exist_ok=True)
  bad_at = dict(zip(sorted(rng.choice(n_train, size=2, replace=False).tolist()),
                    ("missing_image", "bad_artifact_map")))
  manifest = {"root": root, "prompts_path": os.path.join(root, "prompts.json"),
              "images_dir": images_dir, "map_size": map_size, "image_size": image_size,
              "splits": {}, "bad": []}
  prompts = {}
  for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
    records, serialized = [], []
    for i in range(n):
      bad = bad_at.get(i) if split == "train" else None
      source = "test" if split == "test" else "train"  # the Pick-a-Pic split
      filename = f"{source}/{uuid.UUID(bytes=rng.bytes(16), version=4)}.png"
      prompt = _prompt(rng)
      tokens = richhf_tokens(prompt)
      label = [int(rng.random() > 0.3) for _ in tokens]
      maps = {k: _heatmap(rng, map_size) for k in MAPS}
      scores = {k: np.float32(rng.random()) for k in SCORES}
      # Plausibility falls with the artifact area, as it would with real annotators.
      scores["artifact_score"] = np.float32(1 - min(1.0, 4 * maps["artifact_map"].mean() / 255))
      encoded = {k: _png(v) for k, v in maps.items()}
      pixels = _image(rng, image_size, maps)
      if bad == "bad_artifact_map":
        maps["artifact_map"], encoded["artifact_map"] = None, b"not a PNG: " + rng.bytes(32)
      image_path = os.path.join(images_dir, filename)
      if bad != "missing_image":
        os.makedirs(os.path.dirname(image_path), exist_ok=True)
        with open(image_path, "wb") as f:
          f.write(_png(pixels))
      serialized.append(tfrecord.encode_example({
          "filename": filename.encode(), **{k: [v] for k, v in scores.items()}, **encoded,
          "prompt_misalignment_label": " ".join(map(str, label)).encode()}))
      prompts[filename] = prompt
      records.append({"index": i, "filename": filename, "prompt": prompt, "tokens": tokens,
                      "label": label, "scores": scores, **maps, "image_path": image_path,
                      "bad": bad})
      if bad:
        manifest["bad"].append({"split": split, "index": i, "filename": filename, "reason": bad})
    path = os.path.join(root, f"{split}.tfrecord")
    tfrecord.write_records(path, serialized)
    manifest["splits"][split] = {"path": path, "records": records}
  with open(manifest["prompts_path"], "w") as f:
    json.dump(prompts, f, indent=1, sort_keys=True)
  return manifest
