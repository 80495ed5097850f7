"""Runs `python -m fnf_jax.main ARGS` recording every file this process opens for writing or
renames into place (Python's audit hooks), for the multi-process test's one-writer check.

    python tests/process_audit.py RECORD.json -- --config=... --workdir=...
"""

import json
import os
import runpy
import sys


def main():
  record, args = sys.argv[1], sys.argv[3:]
  written = set()

  def hook(event, info):
    if event == "open" and info[0] is not None and isinstance(info[0], (str, bytes, os.PathLike)):
      mode, flags = info[1], info[2]
      if (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR)):
        written.add(os.path.abspath(os.fsdecode(info[0])))
    elif event == "os.rename":
      written.add(os.path.abspath(os.fsdecode(info[1])))

  sys.addaudithook(hook)
  sys.argv = ["fnf_jax.main"] + args
  try:
    runpy.run_module("fnf_jax.main", run_name="__main__")
  finally:
    with open(record, "w") as f:  # not under the workdir
      json.dump(sorted(written), f)


if __name__ == "__main__":
  main()
