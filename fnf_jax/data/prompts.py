"""Prompt sources, chosen by name in a config, each split deterministically into train / eval.

    source   file layout                                   filter
    list     config.texts (a list of strings)              -
    text     one prompt a line (UTF-8)                     -
    parti    PartiPrompts TSV, column `Prompt`             `Category` in config.categories
    i2p      I2P CSV, column `prompt`                      any of config.categories in `categories`

`parti` and `i2p` are read through their TFDS builders (fnf_jax/data/prompt_datasets.py, which
checks the file's layout before anything is built), from the file `path` names (parti with
path "": the PartiPrompts.tsv that fnf_jax ships, fnf_jax/assets); `data_dir` says
where the built dataset lives: "" (the default) builds it into a temporary folder that is
deleted after reading (well under a second; on many hosts each builds its own, so none waits
on a shared folder), a path builds it there once (process 0) and later runs reuse it.
TensorFlow Datasets is imported only when one of those two sources is loaded.

Empty lines are skipped and over-long prompts (more tokens than a tokenizer that reads them
takes: the text encoder's, and a reward's own where it has one) are truncated as that tokenizer
would, and both are reported with their line numbers, in the same words by every job (through
`TokenLimit`s that the job passes), so a silently mangled prompt file cannot go unnoticed.
"""

import dataclasses
import hashlib
import io
from typing import Callable, Sequence

from absl import logging

from fnf_jax.config import choices
from fnf_jax.config import sources
from fnf_jax.data.text import decode

SOURCES = choices.PROMPT_SOURCES
SPLITS = choices.PROMPT_SPLITS


@dataclasses.dataclass(frozen=True)
class TokenLimit:
  """A tokenizer that reads the prompts: `count(prompt)` tokens (special tokens included) of
  at most `max_tokens`; beyond that it truncates."""

  name: str  # e.g. "the text encoder", "reward rahf_alignment's T5"
  count: Callable[[str], int]
  max_tokens: int


@dataclasses.dataclass
class PromptReport:
  """What loading found wrong with a prompt source (1-based line numbers in the file)."""

  empty_lines: list[int] = dataclasses.field(default_factory=list)
  # TokenLimit.name -> (max_tokens, lines of the prompts over it)
  too_long: dict[str, tuple[int, list[int]]] = dataclasses.field(default_factory=dict)
  filtered_out: int = 0

  def summary(self, where: str) -> str:
    parts = []
    if self.empty_lines:
      parts.append(f"{len(self.empty_lines)} empty line(s) skipped (lines {_first(self.empty_lines)})")
    for name, (max_tokens, lines) in self.too_long.items():
      parts.append(f"{len(lines)} prompt(s) longer than {name}'s {max_tokens} tokens, "
                   f"truncated (lines {_first(lines)})")
    if self.filtered_out:
      parts.append(f"{self.filtered_out} row(s) outside the category filter")
    return f"{where}: " + ("; ".join(parts) if parts else "all prompts used as they are")


def _first(lines: list[int], n: int = 10) -> str:
  shown = ", ".join(map(str, lines[:n]))
  return shown + (", ..." if len(lines) > n else "")


def _open(path: str):
  """The file as text (see `decode`)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"prompt file not found: {path!r}") from None
  return io.StringIO(decode(data, path), newline="")


def _read_rows(cfg) -> list[tuple[int, str, tuple[str, ...]]]:
  """(line number, prompt, categories) for every row of the source, in file order."""
  if cfg.source == "list":
    return [(i + 1, p, ()) for i, p in enumerate(cfg.texts)]
  if cfg.source == "text":
    with _open(cfg.path) as f:
      return [(i + 1, line.rstrip("\r\n"), ()) for i, line in enumerate(f)]
  # Imported here: TFDS only for the sources it builds (list and text jobs never load it).
  from fnf_jax.data import prompt_datasets  # pylint: disable=import-outside-toplevel
  # getattr: a cfg without the field (older configs, test namespaces) builds in a temp folder.
  rows = prompt_datasets.read(cfg.source, sources.prompt_file(cfg),
                              data_dir=getattr(cfg, "data_dir", ""))
  if cfg.source == "parti":
    return [(r["line"], r["prompt"], (r["category"],)) for r in rows]
  return [(r["line"], r["prompt"], r["categories"]) for r in rows]


def _keep(cfg, categories: tuple[str, ...]) -> bool:
  wanted = {c.lower() for c in cfg.categories}
  if not wanted or cfg.source in ("list", "text"):  # those layouts carry no categories
    return True
  return bool({c.strip().lower() for c in categories} & wanted)


def _in_eval(prompt: str, eval_fraction: float) -> bool:
  # Hash of the text: stable across runs, machines and file reorderings.
  h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
  return h / 2**64 < eval_fraction


def load(cfg, split: str = "train", *,
         limits: Sequence[TokenLimit] = ()) -> tuple[list[str], PromptReport]:
  """Prompts of `split` from the source described by `cfg` (a ConfigDict or namespace).

  cfg fields: source, path, texts, categories, eval_fraction, data_dir (parti / i2p; "" when
  absent).
  `limits`: the tokenizers that will read the prompts; a prompt over one's limit is reported.
  """
  if cfg.source not in SOURCES:
    raise ValueError(f"prompt source {cfg.source!r} is not one of {SOURCES}")
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  report = PromptReport()
  prompts = []
  for line, prompt, categories in _read_rows(cfg):
    prompt = " ".join(prompt.split())
    if not prompt:
      report.empty_lines.append(line)
      continue
    if not _keep(cfg, categories):
      report.filtered_out += 1
      continue
    for limit in limits:
      if limit.count(prompt) > limit.max_tokens:
        report.too_long.setdefault(limit.name, (limit.max_tokens, []))[1].append(line)
    if split == "all" or _in_eval(prompt, cfg.eval_fraction) == (split == "eval"):
      prompts.append(prompt)
  where = sources.prompt_file(cfg) if cfg.source != "list" else "config prompts.texts"
  if not prompts:
    raise ValueError(f"{where}: no prompts left for split {split!r} "
                     f"(categories {list(cfg.categories)}, eval_fraction {cfg.eval_fraction})")
  logging.info(report.summary(where))
  return prompts, report


def categories(cfg) -> dict[str, tuple[str, ...]]:
  """{prompt (as `load` returns it): its categories} of the source; empty for sources without
  categories (list, text). What an evaluation breaks its numbers down by."""
  if cfg.source in ("list", "text"):
    return {}
  out = {}
  for _, prompt, cats in _read_rows(cfg):
    prompt = " ".join(prompt.split())
    if prompt:
      out.setdefault(prompt, tuple(cats))
  return out

