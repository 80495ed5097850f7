"""RichHF-18K (Liang et al., CVPR 2024) as a TFDS builder: `richhf18k`, splits train / dev / test.

The manual folder (`data.manual_dir` of configs/rahf.py) holds

    train.tfrecord dev.tfrecord test.tfrecord   github.com/google-research-datasets/richhf-18k
    images/<filename>                            the Pick-a-Pic v1 image each record names
    prompts.json                                 {filename: Pick-a-Pic caption}

RichHF-18K ships neither images nor prompts: `tools/extract_pickapic.py` writes `images/` and
`prompts.json` from the Pick-a-Pic parquet shards, extracting only the images the three files
name. An example of the built dataset:

    filename, prompt          text
    image                     the image file's bytes, encoded as Pick-a-Pic stores them
                              (decoded by the reader, fnf_jax/data/reward_data.py)
    artifact_map,             uint8 [H, W] (512² in the release), 0-255, decoded from the PNGs;
    misalignment_map          255 = where annotators marked an artifact / a misalignment
    aesthetics_score, artifact_score, misalignment_score, overall_score
                              float32 (higher is better: artifact_score is plausibility)
    tokens, token_label       the prompt's tokens as RichHF splits it (on any of `,.?!":; `),
                              and one 0/1 per token (0 = misaligned), the labels aligned to them

Nothing is dropped silently: a record whose file name is not a relative path inside images/
(absolute, or climbing out with ".."), whose image is missing or unreadable, whose prompt is
not in prompts.json, whose map is not an image, whose labels do not match the prompt's tokens,
or whose data fails its checksum is left out with its split, filename (or index) and reason,
all listed in the dataset's `dropped.json` and counted in the log (fnf_jax/data/tfds_lib.py).
A file whose first record lacks RichHF's features is refused whole, before anything is built.
"""

import io
import json
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fnf_jax.data import paths
from fnf_jax.data import tfds_lib
from fnf_jax.data import tfrecord

SPLITS = ("train", "dev", "test")
SCORES = ("aesthetics_score", "artifact_score", "misalignment_score", "overall_score")
MAPS = ("artifact_map", "misalignment_map")
FEATURES = ("filename",) + SCORES + MAPS + ("prompt_misalignment_label",)
INSTRUCTIONS = (
    "Put in the manual folder:\n"
    "  train.tfrecord, dev.tfrecord, test.tfrecord  from "
    "github.com/google-research-datasets/richhf-18k\n"
    "  images/ and prompts.json                     written by\n"
    "      python tools/extract_pickapic.py --richhf MANUAL_DIR --pickapic PICKAPIC_PARQUET_DIR "
    "--out MANUAL_DIR\n"
    "  from the Pick-a-Pic v1 parquet shards (huggingface.co/datasets/yuvalkirstain/pickapic_v1,"
    " its data/ folder).")
# RichHF's tokenization of a prompt for its per-token labels (its match_label_to_token.py).
_DELIMITERS = re.compile("|".join(map(re.escape, ',.?!":; ')))


def tokens(prompt: str) -> list[str]:
  return [t for t in _DELIMITERS.split(prompt) if t]


def _gray(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("L"), np.uint8)


def _check_image(data: bytes) -> None:
  with Image.open(io.BytesIO(data)) as im:
    im.verify()  # the header and the data's integrity, without decoding the pixels


class Richhf18k(tfds.core.GeneratorBasedBuilder):
  """RichHF-18K with its Pick-a-Pic images and prompts (module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The three RichHF-18K splits with images, prompts and token labels."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dropped: list[dict] = []  # [{"split", "name", "reason"}], filled while building

  def _info(self) -> tfds.core.DatasetInfo:
    heat = lambda: tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib")
    return tfds_lib.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "filename": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            **{m: heat() for m in MAPS},
            **{s: tfds.features.Scalar(dtype=np.float32) for s in SCORES},
            "tokens": tfds.features.Sequence(tfds.features.Text()),
            "token_label": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32)),
        }),
        homepage="https://github.com/google-research-datasets/richhf-18k",
    )

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    tfds_lib.check_manual(manual, {
        **{f"{s}.tfrecord": f"RichHF-18K's {s} split" for s in SPLITS},
        "images": "the Pick-a-Pic images", "prompts.json": "the Pick-a-Pic captions"},
        "richhf18k", INSTRUCTIONS)
    with open(os.path.join(manual, "prompts.json"), encoding="utf-8") as f:
      prompts = json.load(f)
    for split in SPLITS:  # a file of another schema fails now, not halfway through the build
      self._check_schema(os.path.join(manual, f"{split}.tfrecord"))
    return {s: self._generate_examples(manual, s, prompts) for s in SPLITS}

  def _check_schema(self, path: str) -> None:
    first = next(tfrecord.read_records(path, verify=False), None)
    if first is None:
      raise tfds_lib.DataError(f"{path} holds no records")
    try:
      names = set(tfrecord.decode_example(first))
    except tfrecord.ExampleError as e:
      raise tfds_lib.DataError(f"{path}: its first record is not a tf.train.Example ({e}); "
                               "is this a RichHF-18K file?") from None
    missing = sorted(set(FEATURES) - names)
    if missing:
      raise tfds_lib.DataError(f"{path} is not in RichHF-18K's schema: its records lack "
                               f"{missing} (they have {sorted(names)}; expected {list(FEATURES)})")

  def _drop(self, split: str, name: str, reason: str) -> None:
    self.dropped.append({"split": split, "name": name, "reason": reason})

  def _generate_examples(self, manual: str, split: str, prompts: dict):
    path = os.path.join(manual, f"{split}.tfrecord")
    corrupt = lambda index, message: self._drop(split, f"record {index}", message)
    for index, data in enumerate(tfrecord.read_records(path, on_corrupt=corrupt)):
      example, reason = self._example(manual, data, prompts, f"{path}: record {index}")
      if reason:
        name = example.get("filename") or f"record {index}"
        self._drop(split, name, reason)
        continue
      yield f"{index}", example

  def _example(self, manual: str, data: bytes, prompts: dict,
               where: str) -> tuple[dict, str | None]:
    """(example, None), or (what was read, why the record is left out); `where` names the
    record (file: record index)."""
    try:
      raw = tfrecord.decode_example(data)
    except tfrecord.ExampleError as e:
      return {}, f"not a tf.train.Example: {e}"
    missing = [k for k in FEATURES if k not in raw]
    filename = raw["filename"][0].decode("utf-8", "replace") if raw.get("filename") else ""
    out = {"filename": filename}
    if missing:
      return out, f"missing feature(s) {missing}"
    if not paths.confined(filename):  # joined onto images/: nothing outside it is read
      return out, (f"unsafe_filename: {where} names {filename!r}, not a relative path inside "
                   f"{os.path.join(manual, 'images')}; refused")
    if filename not in prompts:
      return out, "missing_prompt: not in prompts.json"
    image_path = os.path.join(manual, "images", filename)
    if not os.path.isfile(image_path):
      return out, f"missing_image: {image_path}"
    with open(image_path, "rb") as f:
      image = f.read()  # read once: checked here, stored below
    try:
      _check_image(image)
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds
      return out, f"unreadable_image: {image_path} ({type(e).__name__}: {e})"
    for m in MAPS:
      try:
        out[m] = _gray(raw[m][0])
      except Exception as e:  # pylint: disable=broad-except
        return out, f"bad_{m}: not an image ({type(e).__name__})"
    for s in SCORES:
      values = np.asarray(raw[s], np.float32)
      if values.shape != (1,) or not np.isfinite(values[0]):
        return out, f"bad_{s}: {values.tolist()}"
      out[s] = values[0]
    prompt = prompts[filename]
    words = tokens(prompt)
    label_text = raw["prompt_misalignment_label"][0].decode("ascii", "replace").split()
    if len(label_text) != len(words) or any(v not in ("0", "1") for v in label_text):
      return out, (f"bad_label: {len(label_text)} label(s) {label_text[:8]} for the prompt's "
                   f"{len(words)} token(s)")
    out["image"] = image
    out.update(prompt=prompt, tokens=words, token_label=[int(v) for v in label_text])
    return out, None
