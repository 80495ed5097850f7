"""T5's SentencePiece-Unigram tokenizer from a folder's tokenizer.json, with the `tokenizers`
library only (no sentencepiece, no transformers), and a writer of tiny T5-like tokenizers.

`load(folder)` reads `<folder>/tokenizer.json` (google-t5/t5-base ships one) as it is:
normalizer (SentencePiece's precompiled character map), pre-tokenizer (whitespace split, then
Metaspace "▁" before every word), Unigram model and added tokens. The post-processor is set to
T5's `$A </s>`: transformers 5's T5Tokenizer installs that one whatever the file says, and it is
what the hub's file holds, so every prompt ends with </s> as the encoder was trained to see.

`T5Tokenizer(prompts, max_length)` returns what
`tokenizer(prompts, padding="max_length", max_length=L, truncation=True)` gives: ids padded with
<pad> and the attention mask; a truncated prompt keeps </s> last (its text is cut to L - 1).

`write_tiny_tokenizer(folder, words)` writes a T5-like tokenizer of a few hundred entries for
tiny random models (the CPU configs and tests write one at run time; nothing is downloaded).
"""

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

from fnf_jax.models import convert
from fnf_jax.models.clip_tokenizer import TokenizerFilesError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# T5's layout: <pad> 0 (also the decoder start), </s> 1, <unk> 2.
DEFAULT_SPECIAL = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
METASPACE = "\u2581"  # "▁", SentencePiece's word-start marker


class T5TokenizerError(TokenizerFilesError, convert.CheckpointError):
  """The T5 tokenizer folder or its tokenizer.json is missing or unusable.

  A TokenizerFilesError like CLIP's, and a CheckpointError too: the tokenizer usually sits in
  the T5 checkpoint folder, and callers loading both report either failure the same way.
  """


def _missing_message(folder: str) -> str:
  present = sorted(os.listdir(folder))
  return (
      f"no {TOKENIZER_JSON!r} in the T5 tokenizer folder {folder!r} (found {present}). fnf_jax "
      f"reads T5's {TOKENIZER_JSON} with the `tokenizers` library; it does not read "
      "spiece.model (that needs sentencepiece). Get the file once, e.g.\n"
      f"  huggingface-cli download google-t5/t5-base {TOKENIZER_JSON} --local-dir {folder}\n"
      "or, where sentencepiece is installed,\n"
      f"  python -c \"import transformers; transformers.AutoTokenizer.from_pretrained("
      f"'{folder}').save_pretrained('{folder}')\"")


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _special_strings(folder: str) -> dict[str, str]:
  """pad / eos / unk strings from tokenizer_config.json (else special_tokens_map.json), with
  T5's defaults; entries may be strings or AddedToken dicts."""
  config = _read_json(os.path.join(folder, TOKENIZER_CONFIG))
  smap = _read_json(os.path.join(folder, SPECIAL_TOKENS_MAP))
  out = {}
  for key, default in DEFAULT_SPECIAL.items():
    value = config.get(key) or smap.get(key) or default
    out[key] = value["content"] if isinstance(value, dict) else str(value)
  return out


def eos_post_processor(eos: str, eos_id: int) -> processors.TemplateProcessing:
  """T5's post-processor: </s> after the sequence (and after each of a pair)."""
  return processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B", eos],
                                       special_tokens=[(eos, eos_id)])


@dataclasses.dataclass(frozen=True)
class T5Tokenizer:
  """Prompts -> (int32 ids [B, L] padded with <pad>, int32 attention mask [B, L])."""
  backend: Tokenizer
  pad_id: int
  eos_id: int
  unk_id: int
  source: str  # the tokenizer.json read, for messages

  @property
  def vocab_size(self) -> int:
    """Entries of the tokenizer (t5-base: 32,100); the model's table may be larger (32,128)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, prompt: str) -> list[int]:
    """Token ids of one prompt, ending with </s>; no padding or truncation."""
    return self.backend.encode(prompt).ids

  def __call__(self, prompts: Sequence[str] | str,
               max_length: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, str):
      prompts = [prompts]
    if max_length < 1:
      raise ValueError(f"max_length must be at least 1 (room for </s>), got {max_length}")
    ids = np.full((len(prompts), max_length), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(prompts), max_length), dtype=np.int32)
    special = self.backend.post_processor.num_special_tokens_to_add(False)
    for row, prompt in enumerate(prompts):
      # As `tokenizers` truncates: the text to max_length minus the tokens the post-processor
      # adds, then the post-processor, so </s> survives truncation.
      encoding = self.backend.encode(prompt, add_special_tokens=False)
      encoding.truncate(max(max_length - special, 0))
      tokens = self.backend.post_process(encoding).ids[:max_length]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def load(folder: str) -> T5Tokenizer:
  """The T5 tokenizer of a transformers-format folder holding tokenizer.json."""
  if not os.path.isdir(folder):
    raise T5TokenizerError(f"T5 tokenizer folder not found: {folder!r}. Expected a folder "
                              f"holding {TOKENIZER_JSON!r} (e.g. a copy of google-t5/t5-base).")
  path = os.path.join(folder, TOKENIZER_JSON)
  if not os.path.isfile(path):
    raise T5TokenizerError(_missing_message(folder))
  try:
    backend = Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except  # tokenizers' errors omit the path
    raise T5TokenizerError(f"{path!r} is not a readable tokenizer.json ({e})") from e
  specials = _special_strings(folder)
  ids = {}
  for key, token in specials.items():
    token_id = backend.token_to_id(token)
    if token_id is None:
      raise T5TokenizerError(f"{path!r} has no {key} {token!r}; is it a T5 tokenizer?")
    ids[key] = token_id
  backend.post_processor = eos_post_processor(specials["eos_token"], ids["eos_token"])
  return T5Tokenizer(backend=backend, pad_id=ids["pad_token"], eos_id=ids["eos_token"],
                     unk_id=ids["unk_token"], source=path)


# ------------------------------------------------------------------------ tiny tokenizers

# Characters every tiny tokenizer spells, so any prompt in them has no <unk>.
ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
            ".,!?;:'\"()-&/")
DEFAULT_WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "red", "blue", "green", "circle",
    "square", "photo", "cat", "dog", "man", "woman", "holding", "sign", "two", "three", "hand",
    "hands", "fingers", "text", "says", "painting", "portrait", "high", "quality", "sitting",
    "table",
)
DEFAULT_PIECES = ("ing", "ed", "er", "s")


def tiny_vocabulary(words: Sequence[str] = DEFAULT_WORDS,
                    pieces: Sequence[str] = DEFAULT_PIECES) -> list[tuple[str, float]]:
  """Unigram (piece, log-probability) list in T5's order: <pad>, </s>, <unk>, then pieces.

  Whole words ("▁word") score highest, then sub-word pieces, then "▁" and single characters, so
  the Viterbi segmentation spells each of `words` as one token and falls back to pieces and
  letters otherwise, as rare words do in the real vocabulary.
  """
  vocab = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
  seen = {PAD, EOS, UNK}

  def add(piece: str, score: float):
    if piece not in seen:
      seen.add(piece)
      vocab.append((piece, score))

  for i, word in enumerate(words):
    add(METASPACE + word, -2.0 - 0.01 * i)
  for i, piece in enumerate(pieces):
    add(piece, -6.0 - 0.01 * i)
  add(METASPACE, -8.0)
  for i, ch in enumerate(ALPHABET):
    add(METASPACE + ch, -9.0 - 0.001 * i)
    add(ch, -10.0 - 0.001 * i)
  return vocab


def _added(content: str) -> dict:
  return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False, "special": True}


def write_tiny_tokenizer(folder: str, words: Sequence[str] = DEFAULT_WORDS, *,
                         pieces: Sequence[str] = DEFAULT_PIECES,
                         model_max_length: int = 512) -> int:
  """Writes a T5-like tokenizer into `folder` (created if needed); returns its vocabulary size.

  tokenizer.json holds what transformers' T5Tokenizer builds (Unigram with unk id 2, no byte
  fallback; whitespace split + Metaspace; $A </s>), with no normalizer (the real one's
  precompiled map is SentencePiece's NFKC, which these ASCII words do not need).
  tokenizer_config.json / special_tokens_map.json let transformers.T5TokenizerFast read the
  folder; extra_ids is 0 (t5-base has 100 sentinel tokens, which no reward uses).
  """
  os.makedirs(folder, exist_ok=True)
  vocab = tiny_vocabulary(words, pieces)
  backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
  ])
  backend.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always",
                                       split=True)
  backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                              for t in (PAD, EOS, UNK)])
  backend.post_processor = eos_post_processor(EOS, 1)
  backend.save(os.path.join(folder, TOKENIZER_JSON))
  with open(os.path.join(folder, SPECIAL_TOKENS_MAP), "w") as f:
    json.dump({k: _added(v) for k, v in DEFAULT_SPECIAL.items()}, f, indent=2)
  config = {
      "tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0,
      "additional_special_tokens": [], **DEFAULT_SPECIAL,
      "added_tokens_decoder": {str(i): _added(t) for i, t in enumerate((PAD, EOS, UNK))},
  }
  with open(os.path.join(folder, TOKENIZER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return len(vocab)
