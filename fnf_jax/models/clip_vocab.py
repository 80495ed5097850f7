"""Small CLIP tokenizers written to disk: the one writer behind wiring runs, the toy world and tests.

A real CLIP vocabulary has 49,408 entries; a tiny model wants a few hundred. `write(folder,
words=...)` builds a byte-level BPE vocabulary in the layout of OpenAI's (the 256 byte symbols
in byte order, their "</w>" forms, one entry per merge, <|startoftext|> and <|endoftext|> last)
whose merges spell each of `words` as one token; any other text falls back to letters, as rare
words do in the real vocabulary. With no words it is a merge-free tokenizer (one token per
character).

The folder holds every file a published checkpoint may carry, so `clip_tokenizer.load`,
transformers' CLIPTokenizer and diffusers all read it:
  tokenizer.json             what transformers 5's save_pretrained writes
  vocab.json + merges.txt    what the Stable Diffusion checkpoints ship (delete tokenizer.json to
                             exercise that path)
  tokenizer_config.json, special_tokens_map.json   in the transformers 4 layout of those repos
"""

import json
import os
from typing import Sequence

from tokenizers import AddedToken, decoders, processors

from fnf_jax.models import clip_tokenizer

BOS = clip_tokenizer.DEFAULT_SPECIAL["bos_token"]
EOS = clip_tokenizer.DEFAULT_SPECIAL["eos_token"]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """Plain BPE: merge the best-ranked adjacent pair until no known pair is left."""
  while len(symbols) > 1:
    pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
    rank, i = min(pairs)
    if rank == len(ranks):
      break
    symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
  return symbols


def vocabulary(words: Sequence[str] = (), pieces: Sequence[str] = ()
               ) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocab, merges) spelling each word (with "</w>") and each sub-word piece (without) as one
  token, in that priority order.

  Each entry gets merges joining, left to right, what earlier merges leave of it; its merges rank
  after the earlier entries', so they never split those.
  """
  alphabet = clip_tokenizer.byte_alphabet()
  tokens = alphabet + [c + "</w>" for c in alphabet]
  known = set(tokens)
  merges: list[tuple[str, str]] = []
  entries = [list(w[:-1]) + [w[-1] + "</w>"] for w in words] + [list(p) for p in pieces]
  for symbols in entries:
    left, *rest = _bpe(symbols, {m: i for i, m in enumerate(merges)})
    for right in rest:
      merges.append((left, right))
      left += right
      if left not in known:
        tokens.append(left)
        known.add(left)
  if len(set(merges)) != len(merges):
    raise ValueError(f"words {words} / pieces {pieces} produce duplicate merges")
  vocab = {t: i for i, t in enumerate(tokens)}
  vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
  return vocab, merges


def _added(content: str) -> dict:
  return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
          "single_word": False}


def write(folder: str, *, words: Sequence[str] = (), pieces: Sequence[str] = (),
          pad_token: str = EOS, model_max_length: int = 77) -> dict[str, int]:
  """Writes the tokenizer into `folder` (created if needed); returns its vocabulary.

  `pad_token` is "<|endoftext|>" for SD 1.x / CLIP ViT-L and "!" for SD 2.x / OpenCLIP ViT-H;
  `model_max_length` is the number of token positions the text encoder takes.
  """
  os.makedirs(folder, exist_ok=True)
  vocab, merges = vocabulary(words, pieces)
  # The pipeline clip_tokenizer.load rebuilds, plus what transformers also reads from the file.
  backend = clip_tokenizer.build_backend(vocab, merges, EOS)
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.RobertaProcessing(
      (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False)
  backend.add_special_tokens([AddedToken(BOS, normalized=True, special=True),
                              AddedToken(EOS, normalized=True, special=True)])
  backend.save(os.path.join(folder, clip_tokenizer.TOKENIZER_JSON))
  with open(os.path.join(folder, clip_tokenizer.VOCAB_JSON), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, clip_tokenizer.MERGES_TXT), "w", encoding="utf-8") as f:
    # OpenAI's merges.txt starts with a version line; readers skip it.
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  special = {"bos_token": _added(BOS), "eos_token": _added(EOS), "pad_token": pad_token,
             "unk_token": _added(EOS)}
  with open(os.path.join(folder, clip_tokenizer.SPECIAL_TOKENS_MAP), "w") as f:
    json.dump(special, f, indent=2)
  config = {
      "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
      "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer",
      **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v)
         for k, v in special.items()},
  }
  with open(os.path.join(folder, clip_tokenizer.TOKENIZER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return vocab
