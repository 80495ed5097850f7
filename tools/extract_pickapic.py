"""One-time extraction of RichHF-18K's images and captions from the Pick-a-Pic v1 parquet shards
into the manual folder the RichHF-18K dataset builder reads (fnf_jax/data/pickapic.py).

    python tools/extract_pickapic.py --richhf /data/richhf_18k \
        --pickapic /data/pickapic_v1/data --out /data/richhf_18k

--richhf is the folder holding RichHF-18K's train.tfrecord, dev.tfrecord and test.tfrecord.
--pickapic is one or more folders (searched recursively for *.parquet), parquet files or quoted
globs of the shards of huggingface.co/datasets/yuvalkirstain/pickapic_v1 (the train and test
splits at least); they are scanned in sorted path order, and scanning stops once everything is
found. --out gets images/<filename> and prompts.json; with --out equal to --richhf that folder
holds everything the builder needs (otherwise copy the three .tfrecord files there too).

Resumable: rerun the same command after an interruption; images already extracted are kept (not
rewritten) and prompts.json is rebuilt from all the shards given. Run it once, one process at a
time, before building the dataset. Exits 1, after writing what it found, if any needed image or
caption was in none of the shards (it prints which); 2 on unusable input. Needs pyarrow.
"""

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_jax.data import pickapic  # noqa: E402  pylint: disable=g-import-not-at-top

SPLITS = ("train", "dev", "test")


def find_shards(sources: list[str]) -> list[str]:
  """The sorted, distinct .parquet files `sources` (folders, files or globs) name; a source that
  names none raises ValueError naming it."""
  shards = set()
  for source in sources:
    if os.path.isdir(source):
      found = glob.glob(os.path.join(glob.escape(source), "**", "*.parquet"), recursive=True)
    else:
      found = [p for p in glob.glob(source, recursive=True) if p.endswith(".parquet")]
    found = [p for p in found if os.path.isfile(p)]
    if not found:
      kind = "folder" if os.path.isdir(source) else "path or pattern"
      raise ValueError(f"--pickapic {kind} {source!r} holds no .parquet files")
    shards.update(os.path.abspath(p) for p in found)
  return sorted(shards)


def tfrecord_paths(folder: str) -> list[str]:
  paths = [os.path.join(folder, f"{split}.tfrecord") for split in SPLITS]
  absent = [p for p in paths if not os.path.isfile(p)]
  if absent:
    raise ValueError(f"--richhf {folder!r}: no {', '.join(map(os.path.basename, absent))}")
  return paths


def _listed(names: list, limit: int) -> str:
  shown = names if limit <= 0 else names[:limit]
  more = len(names) - len(shown)
  return "\n".join(f"  {n}" for n in shown) + (f"\n  ... and {more} more" if more else "")


def print_report(report: pickapic.ExtractReport, show: int) -> None:
  early = len(report.shards_read) < report.shards_total
  stopped = " (stopped once all were found)" if early else ""
  print(f"shards: read {len(report.shards_read)} of {report.shards_total}{stopped}")
  print(f"images: {report.written} written, {report.existing} already there")
  print(f"found: {report.found} of {report.needed}; captions in {report.prompts_path}")
  if report.conflicts:
    rows = sum(report.conflicts.values())
    print(f"caption conflicts: {len(report.conflicts)} images seen with another caption in "
          f"{rows} rows (the first caption kept):")
    print(_listed([f"{k} ({v})" for k, v in sorted(report.conflicts.items())], show))
  if report.missing:
    print(f"MISSING: {len(report.missing)} of {report.needed} filenames have no image or no "
          f"caption in the shards given:")
    print(_listed(report.missing, show))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--richhf", required=True, help="folder of {train,dev,test}.tfrecord")
  parser.add_argument("--pickapic", required=True, nargs="+",
                      help="Pick-a-Pic v1 parquet shards: folders, files or quoted globs")
  parser.add_argument("--out", required=True, help="the manual folder to write into")
  parser.add_argument("--batch_rows", type=int, default=64, help="parquet rows read at a time")
  parser.add_argument("--show", type=int, default=20,
                      help="filenames listed per problem (0: all of them)")
  args = parser.parse_args(argv)
  try:
    shards = find_shards(args.pickapic)
    paths = tfrecord_paths(args.richhf)
    needed = pickapic.needed(paths)
    print(f"{len(needed)} images named by {args.richhf}/{{{','.join(SPLITS)}}}.tfrecord; "
          f"{len(shards)} parquet shards", flush=True)
    report = pickapic.extract(shards, needed, args.out, batch_rows=args.batch_rows,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
  except (ValueError, OSError) as e:  # PickapicError, TFRecordError are ValueErrors
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  print_report(report, args.show)
  if os.path.realpath(args.out) != os.path.realpath(args.richhf):
    print(f"note: copy {args.richhf}/*.tfrecord into {args.out}: the builder reads them there")
  return 1 if report.missing else 0


if __name__ == "__main__":
  sys.exit(main())
