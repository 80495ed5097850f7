"""fnf_jax.data.pickapic and tools/extract_pickapic.py: RichHF-18K's images and captions pulled
out of Pick-a-Pic-like parquet shards written here.

The world: the mini RichHF of tests/richhf_fixture.py with its images/ and prompts.json deleted
(their bytes and captions kept as the expected output), and three shards, sorted by name:
train-00000 and train-00001 together hold every needed image, on both the _0 and _1 sides, some
twice (within a shard and across the two), between unrelated rows; train-00002 holds only
unrelated rows, so a scan that stops once all is found never reads it. Row groups of 3 rows and
batches of 2 rows exercise the batching.
"""

import json
import os
import shutil
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fnf_jax.data import paths
from fnf_jax.data import pickapic, tfrecord
from richhf_fixture import write_mini_richhf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "extract_pickapic.py")
SCHEMA = pa.schema([("are_different", pa.bool_()), ("caption", pa.string()),
                    ("image_0_uid", pa.string()), ("image_0_url", pa.string()),
                    ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
                    ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
                    ("label_1", pa.float64()), ("ranking_id", pa.int64())])
BATCH_ROWS = 2


@pytest.fixture
def world(tmp_path):
  root = tmp_path / "richhf"
  m = write_mini_richhf(root, n_train=8, n_dev=3, n_test=3, image_size=8, map_size=8)
  records = [r for s in m["splits"].values() for r in s["records"]]
  images = {}
  for r in records:  # the fixture's "missing_image" record has no file: make its bytes up
    path = r["image_path"]
    images[r["filename"]] = (open(path, "rb").read() if os.path.exists(path) else
                             b"\xff\xd8 jpeg bytes of " + r["filename"].encode())
  shutil.rmtree(m["images_dir"])
  os.remove(m["prompts_path"])
  return types.SimpleNamespace(
      root=str(root), shards=str(tmp_path / "pickapic"), images=images,
      captions={r["filename"]: r["prompt"] for r in records},
      filenames=[r["filename"] for r in records],
      tfrecords=[m["splits"][s]["path"] for s in ("train", "dev", "test")])


def _row(caption, uid, jpg, side, n):
  """A comparison row holding (uid, jpg) on `side` and an unrelated image on the other."""
  other = (f"unrelated-{n}", b"other image %d" % n)
  pair = [(uid, jpg), other] if side == 0 else [other, (uid, jpg)]
  return {"are_different": True, "caption": caption, "ranking_id": n, "label_0": 1.0,
          "label_1": 0.0, **{f"image_{s}_uid": u for s, (u, _) in enumerate(pair)},
          **{f"jpg_{s}": j for s, (_, j) in enumerate(pair)},
          **{f"image_{s}_url": f"https://example.com/{u}.png" for s, (u, _) in enumerate(pair)}}


def _needed_row(world, filename, side, n, caption=None):
  return _row(world.captions[filename] if caption is None else caption,
              pickapic.uid_of(filename), world.images[filename], side, n)


def _unrelated(n):
  return _row(f"unrelated prompt {n}", f"stray-{n}", b"stray image %d" % n, n % 2, n)


def write_shards(world, drop=(), extra=(), columns=None) -> list[str]:
  """The three shards of the module docstring, less the rows of the filenames in `drop`, plus
  `extra` rows first in train-00001 (read before the scan can stop); `columns`, if given, keeps
  only those in train-00002."""
  keep = [f for f in world.filenames if f not in drop]
  halves = keep[0::2], keep[1::2]
  second = [_needed_row(world, f, k % 2, 20 + k) for k, f in enumerate(halves[1])]
  shards = [  # in train-00001 the repeats come before the last new uid, so they are scanned
      [_unrelated(100)] + [_needed_row(world, f, k % 2, k) for k, f in enumerate(halves[0])],
      list(extra) + second[:1] + [_unrelated(101)]
      + [_needed_row(world, f, 1 - k % 2, 40 + k) for k, f in enumerate(halves[0][:3])]
      + [_needed_row(world, halves[1][0], 1, 60)] + second[1:],
      [_unrelated(102 + k) for k in range(4)]]
  os.makedirs(world.shards, exist_ok=True)
  paths = []
  for i, rows in enumerate(shards):
    table = pa.Table.from_pylist(rows, SCHEMA)
    if i == 2 and columns is not None:
      table = table.select(columns)
    paths.append(os.path.join(world.shards, f"train-{i:05d}-of-00003.parquet"))
    pq.write_table(table, paths[-1], row_group_size=3)
  return paths


def _extract(world, shards, out=None):
  return pickapic.extract(shards, pickapic.needed(world.tfrecords), out or world.root,
                          batch_rows=BATCH_ROWS)


def _files_under(folder):
  return sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                for d, _, files in os.walk(folder) for f in files)


def _prompts(world):
  with open(os.path.join(world.root, "prompts.json")) as f:
    return json.load(f)


# ---- needed ------------------------------------------------------------------------------------

def test_needed_maps_each_uid_to_its_filename(world):
  got = pickapic.needed(world.tfrecords)
  assert got == {pickapic.uid_of(f): f for f in world.filenames}
  assert len(got) == 14 and all(f.endswith(f"/{u}.png") for u, f in got.items())


@pytest.mark.parametrize("record, problem", [
    (tfrecord.encode_example({"overall_score": [0.5]}), "no single bytes `filename`"),
    (b"\x0a\x05garbage", "malformed tf.train.Example"),
    (tfrecord.encode_example({"filename": b"../etc/x.png"}), "not a relative path"),
    (tfrecord.encode_example({"filename": b"test/a.png"}), "has the uid of 'train/a.png'")])
def test_needed_names_file_and_record_of_a_bad_record(tmp_path, record, problem):
  path = str(tmp_path / "bad.tfrecord")
  tfrecord.write_records(path, [tfrecord.encode_example({"filename": b"train/a.png"}), record])
  with pytest.raises(pickapic.PickapicError, match=f"bad.tfrecord: record 1: .*{problem}"):
    pickapic.needed([path])


# ---- extract -----------------------------------------------------------------------------------

def test_extract_writes_exactly_the_needed_images_and_captions(world):
  shards = write_shards(world)
  report = _extract(world, shards)
  assert (report.found, report.written, report.existing) == (14, 14, 0)
  assert report.missing == [] and report.conflicts == {}
  assert report.shards_read == shards[:2]  # stopped before the shard of unrelated rows
  images_dir = os.path.join(world.root, "images")
  assert _files_under(images_dir) == sorted(world.filenames)  # nothing else, no .tmp left
  for filename, data in world.images.items():
    with open(os.path.join(images_dir, filename), "rb") as f:
      assert f.read() == data, filename
  assert _prompts(world) == world.captions
  with open(report.prompts_path) as f:
    assert list(json.loads(f.read())) == sorted(world.captions)  # sorted keys


def test_a_uid_in_no_shard_is_reported_by_filename(world):
  lost = world.filenames[3]
  shards = write_shards(world, drop=[lost])
  report = _extract(world, shards)
  assert report.missing == [lost] and report.found == 13
  assert report.shards_read == shards  # looked everywhere before giving up
  assert _files_under(os.path.join(world.root, "images")) == sorted(
      f for f in world.filenames if f != lost)
  assert _prompts(world) == {f: c for f, c in world.captions.items() if f != lost}


def test_rerun_keeps_existing_images_and_rebuilds_prompts(world):
  shards = write_shards(world)
  _extract(world, shards)
  images_dir = os.path.join(world.root, "images")
  paths = {f: os.path.join(images_dir, f) for f in world.filenames}
  for path in paths.values():
    os.utime(path, (1_000_000_000, 1_000_000_000))
  redo = world.filenames[5]  # as if the first run had stopped before writing it
  os.remove(paths[redo])
  os.remove(os.path.join(world.root, "prompts.json"))
  report = _extract(world, shards)
  assert (report.written, report.existing, report.missing) == (1, 13, [])
  for filename, path in paths.items():
    if filename != redo:
      assert os.stat(path).st_mtime == 1_000_000_000, filename
  with open(paths[redo], "rb") as f:
    assert f.read() == world.images[redo]
  assert _prompts(world) == world.captions  # captions of the kept images too


def test_rerun_with_every_image_there_reads_no_image_bytes(world, monkeypatch):
  shards = write_shards(world)
  _extract(world, shards)
  os.remove(os.path.join(world.root, "prompts.json"))
  read = []
  iter_batches = pq.ParquetFile.iter_batches
  monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda self, *a, columns=None, **k: (
      read.append(tuple(columns)) or iter_batches(self, *a, columns=columns, **k)))
  report = _extract(world, shards)
  assert (report.written, report.existing, report.missing) == (0, 14, [])
  assert read and set(read) == {("caption", "image_0_uid", "image_1_uid")}
  assert _prompts(world) == world.captions


def test_caption_conflicts_keep_the_first_and_are_counted(world):
  first = world.filenames[0]
  extra = [_needed_row(world, first, 0, 90, caption="another caption"),
           _needed_row(world, first, 1, 91, caption="another caption")]
  report = _extract(world, write_shards(world, extra=extra))
  assert report.conflicts == {first: 2} and report.missing == []
  assert _prompts(world)[first] == world.captions[first]


def test_a_shard_missing_a_column_fails_naming_shard_and_columns(world):
  kept = [c for c in SCHEMA.names if c != "jpg_1"]
  shards = write_shards(world, columns=kept)
  # The last shard would never be scanned: schemas are checked before any scanning.
  with pytest.raises(pickapic.PickapicError) as e:
    _extract(world, shards)
  message = str(e.value)
  assert shards[2] in message and "['jpg_1']" in message and "'jpg_0'" in message
  assert not os.path.exists(os.path.join(world.root, "images"))


# ---- the CLI -----------------------------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, TOOL, *args, "--batch_rows", str(BATCH_ROWS)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(world, tmp_path):
  write_shards(world)
  out = str(tmp_path / "manual")
  proc = _cli("--richhf", world.root, "--pickapic", world.shards, "--out", out)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "found: 14 of 14" in proc.stdout and "MISSING" not in proc.stdout
  assert "copy" in proc.stdout  # --out is not --richhf: the TFRecords still have to go there
  assert _files_under(os.path.join(out, "images")) == sorted(world.filenames)
  with open(os.path.join(out, "prompts.json")) as f:
    assert json.load(f) == world.captions


def test_cli_exits_1_naming_the_missing_image(world):
  lost = world.filenames[7]
  write_shards(world, drop=[lost])
  proc = _cli("--richhf", world.root, "--pickapic", os.path.join(world.shards, "*.parquet"),
              "--out", world.root)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "MISSING: 1 of 14" in proc.stdout and lost in proc.stdout
  assert "found: 13 of 14" in proc.stdout
  assert os.path.exists(os.path.join(world.root, "prompts.json"))  # wrote what it found


def test_cli_fails_at_once_on_a_folder_without_parquet(world, tmp_path):
  empty = tmp_path / "no_shards"
  empty.mkdir()
  proc = _cli("--richhf", world.root, "--pickapic", str(empty), "--out", world.root)
  assert proc.returncode == 2 and f"folder {str(empty)!r} holds no .parquet files" in proc.stderr
  assert not os.path.exists(os.path.join(world.root, "prompts.json"))


@pytest.mark.parametrize("name, ok", [
    ("train/a.png", True), ("a.png", True), ("train/..a.png", True),
    ("../a.png", False), ("train/../../a.png", False), ("/etc/a.png", False),
    ("\\\\server\\a.png", False), ("train//a.png", False), ("./a.png", False),
    ("train\\..\\..\\a.png", False), ("", False), ("a\0.png", False)])
def test_one_rule_keeps_dataset_file_names_inside_their_folder(name, ok):
  assert paths.confined(name) is ok
