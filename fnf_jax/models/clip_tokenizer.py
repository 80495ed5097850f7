"""CLIP's byte-level BPE tokenizer, built with the `tokenizers` library only (no transformers).

`load(folder)` reads a transformers-format tokenizer folder: the vocabulary and merges come from
tokenizer.json where it exists, otherwise from vocab.json + merges.txt (what the published Stable
Diffusion checkpoints ship). Either way the pipeline around them is CLIP's, rebuilt here, which is
also what transformers 5's CLIPTokenizer does (it reads only vocab/merges out of tokenizer.json):

  normalizer     NFC, runs of whitespace -> one space, lowercase
  pre-tokenizer  CLIP's split regex (words, single digits, punctuation runs, 's 't ...), then
                 byte-level (bytes -> printable unicode, no prefix space)
  model          BPE, "</w>" appended to the last symbol of each word
  special        bos/eos/unk/pad are "added tokens", split out of the raw text before BPE

`ClipTokenizer(prompts)` returns what diffusers gets from
`tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`:
[bos, tokens..., eos, pad...], truncated to keep eos last.
"""

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

# transformers' CLIPTokenizer defaults, used where the folder's config files do not say.
DEFAULT_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# CLIP's context length; every published CLIP tokenizer_config.json also says 77.
DEFAULT_MAX_LENGTH = 77
# The pattern of transformers' CLIP tokenizer (and OpenAI's `simple_tokenizer`, minus its
# lower-casing and whitespace cleanup, which the normalizer does).
SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                 r"""[\p{N}]|[^\s\p{L}\p{N}]+""")


def byte_alphabet() -> list[str]:
  """GPT-2 / CLIP byte-level alphabet in byte order: printable bytes stand for themselves, the
  others are mapped above U+0100 (the symbols a byte-level BPE vocabulary starts from)."""
  printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
  extra = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


class TokenizerFilesError(FileNotFoundError):
  """The tokenizer folder or the files it needs are missing or unreadable."""


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _vocab_and_merges(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], str]:
  """(vocab, merges, the file they came from), from tokenizer.json or vocab.json + merges.txt."""
  tok_json = os.path.join(folder, TOKENIZER_JSON)
  if os.path.isfile(tok_json):
    model = _read_json(tok_json).get("model", {})
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
      raise TokenizerFilesError(f"{tok_json!r} does not hold a BPE model (a CLIP tokenizer has "
                                f"one); its model type is {model.get('type')!r}")
    # `tokenizers` >= 0.20 writes merges as [a, b] pairs, older versions as "a b" strings.
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges, tok_json
  vocab_path, merges_path = os.path.join(folder, VOCAB_JSON), os.path.join(folder, MERGES_TXT)
  if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
    present = sorted(os.listdir(folder))
    raise TokenizerFilesError(
        f"no CLIP tokenizer in {folder!r}: expected {TOKENIZER_JSON!r}, or both {VOCAB_JSON!r} "
        f"and {MERGES_TXT!r}; found {present}")
  vocab = _read_json(vocab_path)
  merges = []
  with open(merges_path, encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\r\n")
      # The first line of OpenAI's merges.txt is "#version: 0.2"; `tokenizers` skips it too.
      if not line or line.startswith("#version"):
        continue
      a, b = line.split(" ")
      merges.append((a, b))
  return vocab, merges, vocab_path


def _special_tokens(folder: str) -> tuple[dict[str, AddedToken], int]:
  """bos/eos/unk/pad as AddedTokens and model_max_length, as transformers reads them.

  tokenizer_config.json gives the values; a legacy special_tokens_map.json (present in the SD
  checkpoints) overrides them unless the config carries `added_tokens_decoder` (the layout
  transformers >= 4.34 writes, where the map is ignored). Tokens given as plain strings are
  matched in the raw text (normalized=False); dicts carry their own flags.
  """
  config = _read_json(os.path.join(folder, TOKENIZER_CONFIG))
  values = {k: config[k] for k in DEFAULT_SPECIAL if config.get(k) is not None}
  if "added_tokens_decoder" not in config:
    smap = _read_json(os.path.join(folder, SPECIAL_TOKENS_MAP))
    values.update({k: smap[k] for k in DEFAULT_SPECIAL if smap.get(k) is not None})
  tokens = {}
  for key, default in DEFAULT_SPECIAL.items():
    value = values.get(key, default)
    if isinstance(value, dict):
      flags = {f: bool(value.get(f, False)) for f in ("single_word", "lstrip", "rstrip")}
      tokens[key] = AddedToken(value["content"], normalized=bool(value.get("normalized", False)),
                               special=True, **flags)
    else:
      tokens[key] = AddedToken(str(value), normalized=False, special=True)
  max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
  # transformers writes a huge sentinel (int(1e30)) when no length is known: CLIP's is 77.
  if not isinstance(max_length, int) or max_length > 10**6:
    max_length = DEFAULT_MAX_LENGTH
  return tokens, max_length


def build_backend(vocab: dict[str, int], merges: list[tuple[str, str]],
                  unk_token: str) -> Tokenizer:
  """CLIP's normalizer, pre-tokenizer and BPE model around a vocabulary (no special tokens)."""
  tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                      end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token))
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      # invert=True: the regex matches the pieces to keep; what lies between (spaces) is dropped.
      pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  return tok


@dataclasses.dataclass(frozen=True)
class ClipTokenizer:
  """Prompts -> int32 token ids [B, model_max_length], padded and truncated as diffusers does."""
  backend: Tokenizer
  bos_token_id: int
  eos_token_id: int
  pad_token_id: int
  model_max_length: int
  source: str  # the file the vocabulary came from, for messages

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, prompt: str) -> list[int]:
    """Token ids of one prompt without bos/eos, padding or truncation."""
    return self.backend.encode(prompt, add_special_tokens=False).ids

  def __call__(self, prompts: Sequence[str] | str) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    n = self.model_max_length
    out = np.full((len(prompts), n), self.pad_token_id, dtype=np.int32)
    encodings = self.backend.encode_batch(list(prompts), add_special_tokens=False)
    for row, enc in zip(out, encodings):
      # Truncation keeps room for bos and eos, so eos always closes the sequence (the text
      # encoders pool at it).
      ids = [self.bos_token_id] + enc.ids[:n - 2] + [self.eos_token_id]
      row[:len(ids)] = ids
    return out


def load(folder: str) -> ClipTokenizer:
  """The CLIP tokenizer of a transformers-format folder (e.g. a diffusers `tokenizer/`)."""
  if not os.path.isdir(folder):
    raise TokenizerFilesError(
        f"tokenizer folder not found: {folder!r}. Expected a folder holding {TOKENIZER_JSON!r} "
        f"or {VOCAB_JSON!r} + {MERGES_TXT!r} (and {TOKENIZER_CONFIG!r}).")
  vocab, merges, source = _vocab_and_merges(folder)
  specials, max_length = _special_tokens(folder)
  backend = build_backend(vocab, merges, specials["unk_token"].content)
  # First occurrence wins: eos and pad are often the same string with different flags.
  seen = {}
  for token in specials.values():
    seen.setdefault(token.content, token)
  backend.add_special_tokens(list(seen.values()))
  ids = {}
  for key, token in specials.items():
    token_id = backend.token_to_id(token.content)
    if token_id is None:  # add_special_tokens appends unknown ones, so this cannot happen
      raise TokenizerFilesError(f"{key} {token.content!r} has no id in {source!r}")
    ids[key] = token_id
  return ClipTokenizer(backend=backend, bos_token_id=ids["bos_token"],
                       eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"],
                       model_max_length=max_length, source=source)
