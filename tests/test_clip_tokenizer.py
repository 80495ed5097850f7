"""fnf_jax's CLIP tokenizer against transformers' CLIPTokenizer on the tiny fixture tokenizer."""

import os
import shutil

import numpy as np
import pytest

from fnf_jax.models import clip_tokenizer
from tokenizer_fixture import BOS, EOS, WORDS, write_tiny_clip_tokenizer

PROMPTS = [
    "a photo of a red circle",
    "A PHOTO of a Red Circle",
    "a   photo\tof\n a  red   circle  ",
    "  leading and trailing spaces  ",
    "a red circle!!! and a blue square, 3 cats.",
    "it's a dog's life, isn't it? we'll see; they'd've",
    "1234567 + 89 = 1234656",
    "café crème brûlée, naïve Ωmega 東京 😀 emoji",
    "e\u0301 combining accent (NFC makes it é)",
    "",
    " ",
    "hands!",
    "!!",
    "a photo <|endoftext|> of <|startoftext|>a cat",
    "tabs\tand\u00a0non-breaking\u2003spaces",
    "@#$%^&*()_+-=[]{}|\\:;\"'<>,./?`~",
    " ".join(WORDS * 4),  # far more than 77 tokens: truncation
    "supercalifragilisticexpialidocious " * 10,  # many-byte words: truncation mid-word
]


def _hf_ids(folder, prompts):
  import transformers  # pylint: disable=g-import-not-at-top

  tok = transformers.CLIPTokenizer.from_pretrained(folder)
  # Exactly diffusers' call (StableDiffusionPipeline.encode_prompt).
  out = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True)
  return tok, np.asarray(out["input_ids"])


@pytest.fixture(scope="module", params=[EOS, "!"], ids=["pad_eos", "pad_bang"])
def folders(request, tmp_path_factory):
  """{"tokenizer.json": folder with every file, "vocab_merges": the same without tokenizer.json}."""
  root = tmp_path_factory.mktemp("tok")
  full = str(root / "full")
  write_tiny_clip_tokenizer(full, pad_token=request.param)
  legacy = str(root / "legacy")
  shutil.copytree(full, legacy)
  os.remove(os.path.join(legacy, "tokenizer.json"))
  return request.param, {"tokenizer.json": full, "vocab_merges": legacy}


def test_fixture_loads_in_transformers(tmp_path):
  write_tiny_clip_tokenizer(str(tmp_path))
  tok, ids = _hf_ids(str(tmp_path), ["a photo of a red circle"])
  vocab = tok.get_vocab()
  words = ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "circle</w>"]
  expected = [vocab[BOS]] + [vocab[w] for w in words] + [vocab[EOS]]
  assert list(ids[0, :8]) == expected
  assert (ids[0, 8:] == vocab[EOS]).all() and ids.shape == (1, 77)
  assert tok.bos_token_id == vocab[BOS] and tok.eos_token_id == vocab[EOS]


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab_merges"])
def test_matches_transformers(folders, source):
  pad, paths = folders
  folder = paths[source]
  hf, expected = _hf_ids(folder, PROMPTS)
  tok = clip_tokenizer.load(folder)
  ids = tok(PROMPTS)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
  for prompt, a, b in zip(PROMPTS, ids, expected):
    np.testing.assert_array_equal(a, b, err_msg=repr(prompt))
  assert tok.pad_token_id == hf.pad_token_id == hf.convert_tokens_to_ids(pad)
  assert tok.eos_token_id == hf.eos_token_id
  assert tok.bos_token_id == hf.bos_token_id
  assert tok.model_max_length == hf.model_max_length == 77
  # The long prompts really were truncated with eos kept last.
  assert ids[-1, -1] == tok.eos_token_id and ids[-2, -1] == tok.eos_token_id


def test_both_sources_agree(folders):
  _, paths = folders
  a = clip_tokenizer.load(paths["tokenizer.json"])(PROMPTS)
  b = clip_tokenizer.load(paths["vocab_merges"])(PROMPTS)
  np.testing.assert_array_equal(a, b)


def test_model_max_length_from_config(tmp_path):
  write_tiny_clip_tokenizer(str(tmp_path), model_max_length=16)
  tok = clip_tokenizer.load(str(tmp_path))
  _, expected = _hf_ids(str(tmp_path), PROMPTS)
  assert tok.model_max_length == 16
  np.testing.assert_array_equal(tok(PROMPTS), expected)


def test_single_string_and_encode(tmp_path):
  vocab = write_tiny_clip_tokenizer(str(tmp_path))
  tok = clip_tokenizer.load(str(tmp_path))
  assert tok("a red circle").shape == (1, 77)
  assert tok.encode("a red circle") == [vocab["a</w>"], vocab["red</w>"], vocab["circle</w>"]]
  assert tok.vocab_size == len(vocab)


def test_missing_files_name_the_path(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope.*tokenizer.json"):
    clip_tokenizer.load(missing)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"empty.*merges\.txt.*vocab\.json"):
    clip_tokenizer.load(str(tmp_path / "empty"))


def test_tokenizer_json_with_string_merges(tmp_path):
  """tokenizer.json files written by `tokenizers` < 0.20 (e.g. openai/clip-vit-large-patch14's)
  hold merges as "a b" strings rather than [a, b] pairs."""
  import json  # pylint: disable=g-import-not-at-top

  folder = str(tmp_path)
  write_tiny_clip_tokenizer(folder)
  expected = clip_tokenizer.load(folder)(PROMPTS)
  path = os.path.join(folder, "tokenizer.json")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  assert isinstance(data["model"]["merges"][0], list)
  data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, ensure_ascii=False)
  np.testing.assert_array_equal(clip_tokenizer.load(folder)(PROMPTS), expected)
