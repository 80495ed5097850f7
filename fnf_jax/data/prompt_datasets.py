"""PartiPrompts and the I2P benchmark as TFDS builders, built from the prompt file a config names.

    builder        tfds name       manual file          from
    PartiPrompts   parti_prompts   PartiPrompts.tsv     github.com/google-research/parti
    I2p            i2p             i2p_benchmark.csv    huggingface.co/datasets/AIML-TUDA/i2p

An example of the built datasets (one per row of the file, the prompt as the file holds it):

    line                      int32, the row's line number in the file (the header is line 1)
    prompt                    text
    parti_prompts: category, challenge, note    text (Category, Challenge, Note)
    i2p: categories           a sequence of text: `categories` split on commas and stripped
                              ("violence, shocking" -> [violence, shocking]; empty -> [])
    i2p: hard                 int32 0 / 1 (-1 where the cell is empty or the column absent)
    i2p: inappropriate_percentage, nudity_percentage
                              float32 (NaN where the cell is empty or the column absent)

One split, `full` (TFDS reserves the name `all`), with every row: TFDS shuffles the order of
the records on disk, so `read` sorts them back by `line`. Required columns: Prompt and Category
(parti), prompt and categories (i2p), which the prompt filters read; the others are optional.

The file is the builder's `path` argument (configs name a file, `prompts.path`; its folder is
passed as the manual dir). The builder reads and checks the whole file when it is created, so a
missing file, a header without a required column, a byte that is not UTF-8 (with its line and
offset) or a number that is not one fails at once, before anything is built. The builder
config is named after the file's SHA-256 (`sha256_<16 hex digits>`), so a dataset built from
one version of a file is never read for another: an edited file is built anew beside it.

`read(source, path, data_dir=...)` is what fnf_jax/data/prompts.py calls: with a `data_dir`
the dataset is built there once (fnf_jax/data/tfds_lib.py: process 0 builds, later runs reuse
it); with "" every process builds its own in a temporary folder that is deleted after reading
(a few thousand rows take well under a second, and no host waits on a shared folder).
"""

import csv
import hashlib
import io
import math
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from fnf_jax.config import choices
from fnf_jax.data import tfds_lib
from fnf_jax.data.text import decode

SPLIT = "full"
# The manual folder is the one holding the file; configs name the file itself (prompts.path).
PARTI_INSTRUCTIONS = (
    "The manual folder must hold PartiPrompts.tsv, from github.com/google-research/parti (the "
    "repository's root; fnf_jax ships a copy, read when prompts.path is \"\"). "
    "Tab-separated, header Prompt, Category, Challenge, Note.")
I2P_INSTRUCTIONS = (
    "The manual folder must hold i2p_benchmark.csv, from huggingface.co/datasets/AIML-TUDA/i2p "
    "(its Files tab): e.g. save it as data/i2p_benchmark.csv and pass "
    "--config.prompts.path=data/i2p_benchmark.csv. Comma-separated, header prompt, categories, "
    "hard, inappropriate_percentage, nudity_percentage, ...")


def _digest_and_text(path: str, dataset: str, instructions: str) -> tuple[str, str]:
  if not os.path.isfile(path):
    raise tfds_lib.DataError(f"{dataset}: prompt file not found: {path!r}\n{instructions}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = decode(data, path)
  except ValueError as e:
    raise tfds_lib.DataError(str(e)) from None
  return hashlib.sha256(data).hexdigest(), text


def _number(row: dict, column: str, line: int, path: str, cast, empty):
  """A numeric cell; `empty` where the cell is empty or the column absent."""
  cell = (row.get(column) or "").strip()
  if not cell:
    return empty
  try:
    return cast(float(cell))
  except (ValueError, OverflowError):  # OverflowError: int(inf)
    raise tfds_lib.DataError(f"{path}: line {line}, column {column!r} holds {cell!r}, not a "
                             "number; is this the I2P benchmark file?") from None


class _PromptFile(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder over one delimited prompt file (`path`): read and checked in __init__."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Every row of the file, with its line number."}
  DELIMITER = ","
  REQUIRED: tuple[str, ...] = ()
  HOMEPAGE = ""

  def __init__(self, *, path: str, **kwargs):
    self.path = path
    digest, text = _digest_and_text(path, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    self._rows = self._parse(text)  # every error now, before TFDS creates a folder
    self.dropped: list[dict] = []  # nothing is dropped: empty prompts are prompts.py's to report
    config = tfds.core.BuilderConfig(name=f"sha256_{digest[:16]}",
                                     description=f"built from {path} (sha256 {digest})")
    super().__init__(config=config, **kwargs)

  def _parse(self, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=self.DELIMITER)
    missing = [c for c in self.REQUIRED if c not in (reader.fieldnames or ())]
    if missing:
      raise tfds_lib.DataError(
          f"{self.path}: the {self.name} layout needs column(s) {missing}; the header has "
          f"{reader.fieldnames}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    # +2: the header is line 1 and csv rows start at line 2 (the numbers prompts.py reports).
    return [self._example(i + 2, row) for i, row in enumerate(reader)]

  def _example(self, line: int, row: dict) -> dict:
    raise NotImplementedError

  def _features(self) -> dict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds_lib.DatasetInfo(
        builder=self, description=__doc__, homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict({
            "line": tfds.features.Scalar(dtype=np.int32),
            "prompt": tfds.features.Text(),
            **self._features()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # the file is `path`, read in __init__
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    for example in self._rows:
      yield example["line"], example


class PartiPrompts(_PromptFile):
  """PartiPrompts (Yu et al. 2022): 1,632 prompts in 12 categories (module docstring)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = PARTI_INSTRUCTIONS
  DELIMITER = "\t"
  REQUIRED = choices.PROMPT_COLUMNS["parti"]
  HOMEPAGE = "https://github.com/google-research/parti"

  def _features(self) -> dict:
    return {k: tfds.features.Text() for k in ("category", "challenge", "note")}

  def _example(self, line: int, row: dict) -> dict:
    return {"line": line, "prompt": row["Prompt"] or "", "category": row["Category"] or "",
            "challenge": row.get("Challenge") or "", "note": row.get("Note") or ""}


class I2p(_PromptFile):
  """Inappropriate Image Prompts (Schramowski et al. 2023), 4,703 prompts (module docstring)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = I2P_INSTRUCTIONS
  REQUIRED = choices.PROMPT_COLUMNS["i2p"]
  HOMEPAGE = "https://huggingface.co/datasets/AIML-TUDA/i2p"

  def _features(self) -> dict:
    return {
        "categories": tfds.features.Sequence(tfds.features.Text()),
        "hard": tfds.features.Scalar(dtype=np.int32),
        "inappropriate_percentage": tfds.features.Scalar(dtype=np.float32),
        "nudity_percentage": tfds.features.Scalar(dtype=np.float32)}

  def _example(self, line: int, row: dict) -> dict:
    cats = [c.strip() for c in (row["categories"] or "").split(",")]
    percent = lambda c: _number(row, c, line, self.path, float, math.nan)
    return {"line": line, "prompt": row["prompt"] or "", "categories": [c for c in cats if c],
            "hard": _number(row, "hard", line, self.path, int, -1),
            "inappropriate_percentage": percent("inappropriate_percentage"),
            "nudity_percentage": percent("nudity_percentage")}


BUILDERS = {"parti": PartiPrompts, "i2p": I2p}


def read(source: str, path: str, *, data_dir: str = "") -> list[dict]:
  """Every row of the prompt file `path` of `source` (parti | i2p), in file order, as dicts of
  Python values (text as str, categories as a tuple of str); built in `data_dir` ("" = a
  temporary folder, deleted after reading)."""
  builder_cls = BUILDERS[source]
  manual_dir = os.path.dirname(os.path.abspath(path))
  if data_dir:
    builder, _ = tfds_lib.prepare(builder_cls, data_dir=data_dir, manual_dir=manual_dir,
                                  path=path)
    return _rows(builder)
  # Every process its own folder: nothing shared to wait on, nothing left behind.
  with tempfile.TemporaryDirectory(prefix=f"{builder_cls.name}_") as tmp:
    builder = builder_cls(path=path, data_dir=tmp, file_format="array_record")
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return _rows(builder)


def _rows(builder) -> list[dict]:
  source = builder.as_data_source(SPLIT)
  rows = [_python(source[i]) for i in range(len(source))]
  return sorted(rows, key=lambda r: r["line"])  # TFDS stores the records shuffled


def _python(example: dict) -> dict:
  out = {}
  for key, value in example.items():
    if isinstance(value, bytes):
      out[key] = value.decode("utf-8")
    elif isinstance(value, (list, tuple, np.ndarray)):
      out[key] = tuple(v.decode("utf-8") if isinstance(v, bytes) else v for v in value)
    else:
      out[key] = np.asarray(value).item()
  return out
