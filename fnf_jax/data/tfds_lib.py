"""Preparing and reading our TFDS builders (array_record files, read without TensorFlow).

Every dataset of fnf_jax is a `tfds.core.GeneratorBasedBuilder` with `file_format="array_record"`:
`prepare` builds it once into `data_dir` (from the files the user put in `manual_dir`), and the
jobs read it by random access (`builder.as_data_source(split)`, a sequence of dicts of numpy
values), through grain where a job streams it. TensorFlow is never imported: array_record
builders whose features are numpy tensors, text and scalars encode and decode without it.

One writer: on several hosts only process 0 builds; the others wait for the finished dataset
(TFDS writes into a temporary folder and renames it into place when it is complete, so a reader
never sees half a dataset). What a builder dropped while building (a record it could not read,
with its name and why) is written beside the dataset as `dropped.json` by that one process, and
read back by every later run: the report is the same whether this run built it or found it.
"""

import json
import os
import time

import tensorflow_datasets as tfds
from absl import logging

DROPPED = "dropped.json"
WAIT_S = 6 * 3600  # how long a non-writing process waits for process 0 to build a dataset


class DataError(ValueError):
  """A dataset's manual files are missing or unusable; the message says what to put where."""


class DatasetInfo(tfds.core.DatasetInfo):
  """The DatasetInfo of our builders: it skips TFDS's look-up of precomputed info in
  gs://tfds-data (ours are never there), which with GCS access disabled returns early and leaves
  an empty `tmp*tfds` folder in $TMPDIR for every builder created before its dataset is built."""

  def initialize_from_bucket(self) -> None:
    pass


def check_manual(manual_dir: str, needed: dict[str, str], dataset: str, instructions: str) -> None:
  """Fails, before anything is built, unless `manual_dir` holds every `needed` file
  ({relative path: what it is}), naming the missing ones and how to get them."""
  if not manual_dir or not os.path.isdir(manual_dir):
    raise DataError(f"{dataset}: the manual folder {manual_dir!r} does not exist.\n{instructions}")
  missing = [f"  {os.path.join(manual_dir, p)}  ({what})" for p, what in needed.items()
             if not os.path.exists(os.path.join(manual_dir, p))]
  if missing:
    raise DataError(f"{dataset}: missing from the manual folder {manual_dir}:\n"
                    + "\n".join(missing) + f"\n{instructions}")


def prepare(builder_cls, *, data_dir: str, manual_dir: str | None = None, **kwargs):
  """The builder of `builder_cls` in `data_dir`, built first if it is not there yet.

  Returns (builder, dropped): dropped = the records the build left out, [{"split", "name",
  "reason"}, ...], from the build itself or from its `dropped.json`.
  """
  tfds.disable_progress_bar()  # one line per dataset in the log, not a bar per shard
  import jax  # pylint: disable=import-outside-toplevel  # the process index, nothing else
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = builder_cls(data_dir=data_dir, file_format="array_record", **kwargs)
  done = os.path.join(builder.data_dir, "dataset_info.json")
  if not os.path.exists(done):
    if manual_dir is not None and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
      raise DataError(f"{builder.name}: the manual folder {manual_dir!r} does not exist or is "
                      f"empty.\n{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if jax.process_index() == 0:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
      dropped = list(getattr(builder, "dropped", []))
      tmp = os.path.join(builder.data_dir, DROPPED + ".tmp")
      with open(tmp, "w") as f:
        json.dump(dropped, f, indent=1)
      os.replace(tmp, os.path.join(builder.data_dir, DROPPED))
    else:
      _wait_for(done, builder.name)
      builder = builder_cls(data_dir=data_dir, file_format="array_record", **kwargs)
  dropped = read_dropped(builder.data_dir)
  for split, info in builder.info.splits.items():
    n = sum(1 for d in dropped if d["split"] == split)
    logging.info("%s[%s]: %d examples in %s%s", builder.name, split, info.num_examples,
                 builder.data_dir, f" ({n} record(s) dropped: {DROPPED})" if n else "")
  return builder, dropped


def read_dropped(folder: str) -> list[dict]:
  """The `dropped.json` beside a built dataset ([] when the build dropped nothing)."""
  path = os.path.join(folder, DROPPED)
  for _ in range(60):  # process 0 writes it just after the dataset's own files
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    time.sleep(1.0)
  raise DataError(f"{folder} holds a dataset without its {DROPPED}: it was built by another "
                  f"tool or the build was killed; delete {folder} to build it again")


def _wait_for(path: str, name: str) -> None:
  deadline = time.time() + WAIT_S
  while not os.path.exists(path):
    if time.time() > deadline:
      raise DataError(f"{name}: waited {WAIT_S} s for process 0 to build the dataset "
                      f"({path} never appeared); see process 0's log")
    time.sleep(5.0)
