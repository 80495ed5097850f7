"""RichHF-18K's images and captions, extracted from the Pick-a-Pic v1 parquet shards.

RichHF-18K (train/dev/test.tfrecord) holds no images and no prompts: each record's `filename`
(b"train/<uid>.png"; train and dev name Pick-a-Pic v1 train images, test its test images) points
into Pick-a-Pic v1 (huggingface.co/datasets/yuvalkirstain/pickapic_v1), which one downloads as
parquet shards (data/{train,validation,test}-XXXXX-of-YYYYY.parquet). The RichHF builder wants a
manual folder holding, next to the TFRecords,

* `images/<filename>`: the image bytes exactly as Pick-a-Pic stores them (whatever the extension
  in `filename` says: they are not decoded or re-encoded here), and
* `prompts.json`: {filename: caption}, sorted keys.

`needed(tfrecord_paths)` maps each record's uid (the stem of `filename`) to its filename;
`extract(shards, needed, out_dir)` scans the shards and writes both. A Pick-a-Pic row is one
comparison of two images of one caption; of its columns only `caption`, `image_0_uid`,
`image_1_uid`, `jpg_0` and `jpg_1` are read (every shard is checked for them, and their types,
before any is scanned: a shard lacking one fails naming the shard and the columns it has). A uid
is matched on either side of a row, in any shard; an image uid recurs in several rows (same image,
same caption), so the first row that holds it supplies its image and its caption. A uid seen with
a second, different caption keeps the first; the report counts the rows that disagreed (among the
rows scanned: scanning stops as soon as every needed uid has its image and its caption).

Memory stays bounded: shards are read in row batches (`ParquetFile.iter_batches`, `batch_rows`
rows; a shard is several GB, a row up to a few MB of image bytes; pyarrow decodes a row group
at a time), and only the matching rows' image bytes become Python objects.

Resumable: each image is written to `<path>.tmp` and renamed into place (`os.replace`), so an
image under `images/` is always complete; an image already there is not rewritten, and its row is
still looked for so that its caption goes into `prompts.json` (written last, the same way). A
rerun after an interruption thus redoes only the scanning (once no image is left to write, of
the caption and uid columns only, a small part of the bytes), and must be given all the shards:
`prompts.json` holds the captions of the rows this run scanned, nothing carried over.

One writer: this is a single-process, one-time step, run once before the dataset is built (by
tools/extract_pickapic.py); two runs on one `out_dir` at once are not supported.

pyarrow is imported only inside `extract`; the rest of fnf_jax never needs it.
"""

import dataclasses
import json
import os
from typing import Callable, Iterable, Sequence

from fnf_jax.data import paths
from fnf_jax.data import tfrecord

COLUMNS = ("caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1")
SIDES = (("image_0_uid", "jpg_0"), ("image_1_uid", "jpg_1"))


class PickapicError(ValueError):
  """A RichHF record or a Pick-a-Pic shard this module cannot use."""


@dataclasses.dataclass
class ExtractReport:
  """What `extract` did. `missing` lists (sorted) the filenames that end without an image under
  images/ or without a caption: their uid was in no row scanned (or only with empty bytes or a
  null caption). `conflicts` maps a filename to how many scanned rows gave it a caption other
  than the one kept."""
  needed: int
  written: int = 0          # images written by this run
  existing: int = 0         # images already under images/, left as they were
  missing: list = dataclasses.field(default_factory=list)
  conflicts: dict = dataclasses.field(default_factory=dict)
  shards_read: list = dataclasses.field(default_factory=list)
  shards_total: int = 0
  prompts_path: str = ""

  @property
  def found(self) -> int:
    """Needed filenames that have both their image and their caption."""
    return self.needed - len(self.missing)


def uid_of(filename: str) -> str:
  """The Pick-a-Pic image uid a RichHF filename names: its basename without the extension."""
  return os.path.splitext(os.path.basename(filename))[0]


def _check_filename(filename: str, where: str) -> None:
  # The filename becomes a path under out_dir/images: keep it there.
  if not uid_of(filename) or not paths.confined(filename):
    raise PickapicError(f"{where}: filename {filename!r} is not a relative path to an image")


def _record_filename(data: bytes, where: str) -> str:
  try:
    value = tfrecord.decode_example(data).get("filename")
  except tfrecord.ExampleError as e:
    raise PickapicError(f"{where}: {e}") from None
  if not isinstance(value, list) or len(value) != 1:
    raise PickapicError(f"{where}: no single bytes `filename` feature (found {value!r})")
  try:
    filename = value[0].decode("utf-8")
  except UnicodeDecodeError:
    raise PickapicError(f"{where}: filename {value[0]!r} is not UTF-8") from None
  _check_filename(filename, where)
  return filename


def needed(tfrecord_paths: Iterable) -> dict[str, str]:
  """uid -> filename for every record of the RichHF TFRecord files `tfrecord_paths`.

  A record that does not decode, lacks a single `filename`, or names an unsafe path raises
  PickapicError naming the file and the record index (tfrecord.TFRecordError for a broken file):
  RichHF's records all have one, so a bad one means a damaged download, not data to skip. Two
  filenames with one uid (train/x.png and test/x.png) raise too: Pick-a-Pic holds one image per
  uid. The same filename twice is fine (one entry).
  """
  out: dict[str, str] = {}
  for path in tfrecord_paths:
    path = os.fspath(path)
    for index, data in enumerate(tfrecord.read_records(path)):
      where = f"{path}: record {index}"
      filename = _record_filename(data, where)
      uid = uid_of(filename)
      if out.setdefault(uid, filename) != filename:
        raise PickapicError(f"{where}: filename {filename!r} has the uid of {out[uid]!r}")
  return out


def _open_checked(pq, pa, shard: str):
  """The shard's ParquetFile, after checking it has COLUMNS with usable types."""
  try:
    f = pq.ParquetFile(shard)
  except (OSError, pa.ArrowException) as e:
    raise PickapicError(f"{shard}: not a readable parquet file: {e}") from None
  schema = f.schema_arrow
  absent = [c for c in COLUMNS if c not in schema.names]
  if absent:
    raise PickapicError(f"{shard}: no column(s) {absent}; it has {schema.names}")
  for name in COLUMNS:
    t = schema.field(name).type
    ok = (pa.types.is_binary(t) or pa.types.is_large_binary(t)) if name.startswith("jpg") else (
        pa.types.is_string(t) or pa.types.is_large_string(t))
    if not ok:
      raise PickapicError(f"{shard}: column {name!r} has type {t}, expected "
                          f"{'binary' if name.startswith('jpg') else 'string'}")
  return f


def _write_atomic(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


class _Scan:
  """The state of one extraction: what is still wanted, what was found."""

  def __init__(self, needed_: dict, images_dir: str, report: ExtractReport):
    self.needed, self.images_dir, self.report = needed_, images_dir, report
    self.captions: dict[str, str] = {}  # uid -> the first caption seen
    self.want_image = set()
    for uid in needed_:
      if os.path.isfile(self.image_path(uid)):
        report.existing += 1
      else:
        self.want_image.add(uid)

  def image_path(self, uid: str) -> str:
    return os.path.join(self.images_dir, *self.needed[uid].split("/"))

  def done(self) -> bool:
    return not self.want_image and len(self.captions) == len(self.needed)

  def take(self, uid: str, caption, get_bytes: Callable[[], bytes]) -> None:
    if caption is not None:
      kept = self.captions.setdefault(uid, caption)
      if kept != caption:
        filename = self.needed[uid]
        self.report.conflicts[filename] = self.report.conflicts.get(filename, 0) + 1
    if uid in self.want_image:
      data = get_bytes()
      if data:  # an empty cell: hope for another row
        _write_atomic(self.image_path(uid), data)
        self.want_image.discard(uid)
        self.report.written += 1

  def batch(self, batch) -> None:
    # Python set lookups on the uid columns: cheap next to reading the image bytes, and
    # indifferent to string vs large_string.
    captions = batch.column("caption")
    for uid_col, jpg_col in SIDES:
      for i, uid in enumerate(batch.column(uid_col).to_pylist()):
        if uid in self.needed:
          self.take(uid, captions[i].as_py(), lambda i=i, c=jpg_col: batch.column(c)[i].as_py())


def extract(shards: Sequence, needed: dict, out_dir, *, batch_rows: int = 64,
            progress: Callable[[str], None] | None = None) -> ExtractReport:
  """Writes out_dir/images/<filename> and out_dir/prompts.json for `needed` (uid -> filename,
  as `needed()` returns it) from the Pick-a-Pic parquet `shards`, scanned in the order given;
  see the module docstring. `batch_rows` rows are read at a time (64 rows of two images: ~100
  MB). `progress`, if given, gets a line per shard scanned. A missing image or caption is
  reported in the returned ExtractReport, not raised: prompts.json is written either way."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top  # only this one-time step needs it
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  if batch_rows < 1:
    raise ValueError(f"batch_rows must be positive, got {batch_rows}")
  out_dir, shards = os.fspath(out_dir), [os.fspath(s) for s in shards]
  for shard in shards:  # schemas first: fail before hours of scanning, not after
    _open_checked(pq, pa, shard).close()
  report = ExtractReport(needed=len(needed), shards_total=len(shards),
                         prompts_path=os.path.join(out_dir, "prompts.json"))
  scan = _Scan(needed, os.path.join(out_dir, "images"), report)
  for shard in shards:
    if scan.done():
      break
    report.shards_read.append(shard)
    # Every image already there (a rerun): the captions alone are a small part of the bytes.
    columns = list(COLUMNS if scan.want_image else COLUMNS[:3])
    with _open_checked(pq, pa, shard) as f:
      for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
        scan.batch(batch)
        if scan.done():
          break
    if progress:
      progress(f"{shard}: {len(scan.captions)}/{len(needed)} captions, "
               f"{len(needed) - len(scan.want_image)}/{len(needed)} images")
  report.missing = sorted(needed[u] for u in needed
                          if u in scan.want_image or u not in scan.captions)
  prompts = {needed[u]: c for u, c in scan.captions.items()}
  text = json.dumps(prompts, indent=1, sort_keys=True) + "\n"  # ASCII: any reader's locale
  _write_atomic(report.prompts_path, text.encode("ascii"))
  return report
