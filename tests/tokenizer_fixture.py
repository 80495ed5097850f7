"""The tests' tiny CLIP tokenizer: `fnf_jax.models.clip_vocab.write` with a few hundred entries'
worth of common prompt words, so e.g. "a photo of a red circle" is one token per word and tests
never download a tokenizer. A few sub-word pieces ("ing", "ed") make longer words split into
several tokens, as in the real vocabulary."""

from fnf_jax.models import clip_vocab

BOS, EOS = clip_vocab.BOS, clip_vocab.EOS

# Words that become single tokens (with "</w>"), in merge priority order.
WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "red", "blue", "green", "circle",
    "square", "photo", "cat", "dog", "man", "woman", "holding", "sign", "two", "three", "hand",
    "hands", "fingers", "text", "says", "painting", "portrait", "high", "quality", "sitting",
    "table", "!", ".", ",", "1", "2", "3",
)
PIECES = ("ing", "ed", "er", "th", "st")


def write_tiny_clip_tokenizer(folder: str, *, pad_token: str = EOS,
                              model_max_length: int = 77) -> dict[str, int]:
  """Writes the tiny tokenizer into `folder` (created if needed); returns its vocabulary."""
  return clip_vocab.write(folder, words=WORDS, pieces=PIECES, pad_token=pad_token,
                          model_max_length=model_max_length)
