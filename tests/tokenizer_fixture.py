"""A tiny CLIP-style byte-level BPE tokenizer written to disk, so that tests never download one.

The layout mirrors OpenAI's CLIP vocabulary: the 256 byte-level symbols (GPT-2's byte->unicode
table, in its order), their "</w>" (end of word) variants, one entry per merge, then
<|startoftext|> and <|endoftext|> last. The merges spell a few hundred entries' worth of common
prompt words, so e.g. "a photo of a red circle" is one token per word.

The folder holds every file a published checkpoint may carry:
  tokenizer.json             what transformers 5 save_pretrained writes (the `tokenizers` format)
  vocab.json + merges.txt    what the Stable Diffusion checkpoints ship
  tokenizer_config.json, special_tokens_map.json   in the transformers 4 layout of those repos
Delete tokenizer.json to exercise the vocab/merges path.
"""

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words that become single tokens (with "</w>"), in merge priority order. A few sub-word pieces
# ("ing", "ed") make longer words split into several tokens, as in the real vocabulary.
WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "red", "blue", "green", "circle",
    "square", "photo", "cat", "dog", "man", "woman", "holding", "sign", "two", "three", "hand",
    "hands", "fingers", "text", "says", "painting", "portrait", "high", "quality", "sitting",
    "table", "!", ".", ",", "1", "2", "3",
)
PIECES = ("ing", "ed", "er", "th", "st")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode table (the alphabet of byte-level BPE)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in printable}
  n = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + n)
      n += 1
  return table


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
  alphabet = list(bytes_to_unicode().values())
  tokens = alphabet + [c + "</w>" for c in alphabet]
  merges: list[tuple[str, str]] = []
  known = set(tokens)

  def bpe(symbols: list[str]) -> list[str]:
    # Plain BPE with the merges so far: merge the lowest-ranked adjacent pair until none is left.
    rank = {m: i for i, m in enumerate(merges)}
    while len(symbols) > 1:
      pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
      best, i = min(pairs)
      if best == len(rank):
        break
      symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols

  def spell(symbols: list[str]) -> None:
    # Appends merges joining what the existing merges leave, left to right. Later merges rank
    # lower, so they never split a word spelled earlier, and this word ends up as one token.
    pieces = bpe(symbols)
    current = pieces[0]
    for nxt in pieces[1:]:
      merged = current + nxt
      merges.append((current, nxt))
      if merged not in known:
        tokens.append(merged)
        known.add(merged)
      current = merged

  for word in WORDS:
    if len(word) > 1:
      spell(list(word[:-1]) + [word[-1] + "</w>"])
  for piece in PIECES:
    spell(list(piece))
  assert len(set(merges)) == len(merges), "duplicate merges"
  vocab = {t: i for i, t in enumerate(tokens)}
  vocab[BOS] = len(vocab)
  vocab[EOS] = len(vocab)
  return vocab, merges


def _backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
  """The `tokenizers` pipeline of CLIP (what transformers' CLIP converter builds)."""
  tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                      end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(
          Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
          behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),
                                                    trim_offsets=False, add_prefix_space=False)
  tok.add_special_tokens([AddedToken(BOS, normalized=True, special=True),
                          AddedToken(EOS, normalized=True, special=True)])
  return tok


def _added_token(content: str) -> dict:
  return {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
          "single_word": False}


def write_tiny_clip_tokenizer(folder: str, *, pad_token: str = EOS,
                              model_max_length: int = 77) -> dict[str, int]:
  """Writes the tiny tokenizer into `folder` (created if needed); returns its vocabulary.

  `pad_token` is "<|endoftext|>" for SD 1.x / CLIP ViT-L and "!" for SD 2.x / OpenCLIP ViT-H.
  """
  os.makedirs(folder, exist_ok=True)
  vocab, merges = _vocab_and_merges()
  _backend(vocab, merges).save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    # OpenAI's merges.txt starts with a version line; readers skip lines starting with "#".
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  special = {"bos_token": _added_token(BOS), "eos_token": _added_token(EOS),
             "pad_token": pad_token, "unk_token": _added_token(EOS)}
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  config = {
      "add_prefix_space": False,
      "do_lower_case": True,
      "errors": "replace",
      "model_max_length": model_max_length,
      "tokenizer_class": "CLIPTokenizer",
      **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v)
         for k, v in special.items()},
  }
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return vocab
