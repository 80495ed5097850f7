"""File names read from a dataset's records, kept inside the folder they are joined onto.

A record's file name (RichHF-18K's `filename`, b"train/<uid>.png") becomes a path under a local
folder (images/): a name that is absolute, or climbs out with "..", would read or write a file
anywhere on the machine. Used by fnf_jax/data/pickapic.py (which writes images/) and
fnf_jax/data/richhf18k.py (which reads them).
"""

import os


def confined(filename: str) -> bool:
  """True for a relative path that stays inside the folder it is joined onto: not empty, not
  absolute (a leading / or \\, or a drive), no empty, "." or ".." part (either separator), no
  NUL byte."""
  if not filename or "\0" in filename or os.path.isabs(filename):
    return False
  if filename.startswith(("/", "\\")) or os.path.splitdrive(filename)[0]:
    return False
  parts = filename.replace("\\", "/").split("/")
  return not {"", ".", ".."} & set(parts)
