"""One JSON line per measured result, printed and appended to a file as soon as it exists, so
that a run stopped by its time limit still leaves what it measured (benchmarks/gpu.sh)."""

import json
import os


def emit(row: dict, path: str | None = None) -> dict:
  """Prints `row` as one JSON line and appends it to `path` (default: $RESULTS, if set)."""
  line = json.dumps(row)
  print(line, flush=True)
  path = path or os.environ.get("RESULTS")
  if path:
    with open(path, "a") as f:
      f.write(line + "\n")
  return row
