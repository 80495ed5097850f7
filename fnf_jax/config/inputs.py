"""The files and folders a config names: each checked before anything loads, every missing or
broken one gathered into one message (`MissingInputs`) that says where to get it
(fnf_jax/config/sources.py). `fnf_jax.config.validate` runs a job's rule set inside
`gathering_inputs`; outside it `existing` raises at the first missing input.

Cheap on purpose: existence, a folder's marker file, the safetensors headers (a truncated
download is found from them alone) and a prompt file's text; nothing heavy is imported.
"""

import contextlib
import csv
import dataclasses
import json
import os
import struct

from fnf_jax.config import choices
from fnf_jax.config import sources
from fnf_jax.config.errors import ConfigError
from fnf_jax.config.fields import text, value
from fnf_jax.data.text import decode


def existing(config, key: str, *, folder: bool | None, inside: str = "") -> bool:
  """config.<key> names an existing folder (folder=True; holding the file `inside` if given),
  file (False) or either (None). A missing one raises ConfigError saying where to get it, or,
  while `gathering_inputs`, is recorded so that one message names every missing input;
  returns whether it exists."""
  path = value(config, key)
  exists = {True: os.path.isdir, False: os.path.isfile, None: os.path.exists}[folder]
  present = isinstance(path, str) and bool(path) and exists(path) and (
      not inside or os.path.isfile(os.path.join(path, inside)))
  kind = {True: "folder", False: "file", None: "file or folder"}[folder]
  problem = ""
  if inside and not present and isinstance(path, str) and path and exists(path):
    problem = f"no {inside} in the folder (an empty or incomplete download?)"
  elif present:
    problem = broken_safetensors(path)
  return require(Input(key, path, kind, sources.for_key(config, key), present and not problem,
                       problem))


def broken_safetensors(path: str) -> str:
  """What is wrong with the first .safetensors file at `path` (a file, or a folder searched
  recursively) whose header does not parse or whose data ends before the header says: a
  truncated download, found from the headers alone, before anything loads ("" when none)."""
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
  for file in files:
    if not file.endswith(".safetensors"):
      continue
    size = os.path.getsize(file)
    where = os.path.relpath(file, path) if file != path else "the file"
    try:
      with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 2**20:  # safetensors caps its header at 100 MB: another format
          raise ValueError(length)
        if 8 + length > size:  # cut inside the header
          return f"{where} is truncated ({size:,} bytes, its header alone {8 + length:,})"
        header = json.loads(f.read(length))
      need = 8 + length + max((e["data_offsets"][1] for k, e in header.items()
                               if k != "__metadata__"), default=0)
    except (struct.error, ValueError, TypeError, AttributeError, KeyError, IndexError):
      return f"{where} is not a safetensors file"
    if size < need:
      return f"{where} is truncated ({size:,} of {need:,} bytes): download or convert it again"
  return ""


def require(found: "Input") -> bool:
  """Records `found` while `gathering_inputs`; else raises ConfigError if it is missing."""
  if _gathered is not None:
    _gathered.append(found)
  elif not found.present:
    raise ConfigError(found.describe())
  return found.present


@dataclasses.dataclass(frozen=True)
class Input:
  """A file or folder a config names."""
  key: str  # the config key (or a label, for an entry of a tuple such as eval.runs)
  path: str
  kind: str  # "file", "folder", "file or folder"
  source: str  # its entry in fnf_jax.config.sources ("" for none)
  present: bool  # there and whole
  problem: str = ""  # what is wrong with it when it is there but not whole

  def describe(self) -> str:
    line = (f"config.{self.key} is empty" if not self.path else
            f"config.{self.key} = {self.path!r}: {self.problem or 'no such ' + self.kind}")
    if not self.source:
      return line
    path = self.path or sources.DEFAULT_PATHS.get(self.source, "PATH")
    return (f"{line}. Get {sources.text(self.source, path)}\nthen pass "
            f"--config.{self.key}={path}")


# The inputs met while `gathering_inputs` runs; None: `existing` raises at the first missing.
_gathered: list[Input] | None = None


@contextlib.contextmanager
def gathering_inputs():
  """Within: `existing` records every input (a missing one too, instead of raising); yields
  the list."""
  global _gathered
  outer, _gathered = _gathered, []
  try:
    yield _gathered
  finally:
    _gathered = outer


class MissingInputs(ConfigError):
  """Every missing input of a config, in one message."""

  def __init__(self, missing: list[Input]):
    self.missing = list(missing)
    n = len(self.missing)
    lines = [f"{n} input{'s' if n > 1 else ''} the config names {'are' if n > 1 else 'is'} "
             f"missing (nothing was loaded; {sources.README} lists them all):"]
    for i, m in enumerate(self.missing, 1):
      lines.append(f"  {i}. " + m.describe().replace("\n", "\n     "))
    super().__init__("\n".join(lines))


def lora_source(config, key: str) -> None:
  """A LoRA to read (fnf_jax/models/lora_io.py): "" = none, else a file or a run's workdir."""
  text(config, key)
  if value(config, key):  # "" = none
    existing(config, key, folder=None)


def prompt_file(path: str, source: str) -> None:
  """A prompt file that cannot give a prompt fails now, not after the model has loaded: not
  UTF-8 (a binary file), no prompt in it, or (parti / i2p) a header without their columns."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    lines = decode(data, path).splitlines()
  except ValueError as e:
    raise ConfigError(f"config.prompts.path: {e}") from None
  columns = choices.PROMPT_COLUMNS.get(source, ())
  if columns:
    delimiter = "\t" if source == "parti" else ","
    header = next(csv.reader(lines[:1], delimiter=delimiter), [])
    if not set(columns) <= set(header):
      raise ConfigError(f"config.prompts.path = {path!r} is not a prompts.source = {source!r} "
                        f"file: its header needs the columns {list(columns)}, it has "
                        f"{header[:8]}. Get {sources.text(source, path)}")
    lines = lines[1:]
  if not any(line.strip() for line in lines):
    raise ConfigError(f"config.prompts.path = {path!r} has no prompt in it "
                      f"({len(data)} bytes); prompts.source = {source!r} reads "
                      f"{sources.text(source, path)}")
