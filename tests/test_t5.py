"""Flax T5 encoder and T5 tokenizer against transformers' PyTorch T5EncoderModel / T5TokenizerFast,
on tiny random models saved with save_pretrained and a tiny tokenizer written at run time.

Tolerance: relative error ||a - b|| / ||b|| <= 1e-4 in float32 (conftest forces "highest"
matmul precision), except where a comment says otherwise.
"""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax.models import convert, t5, t5_tokenizer
from fnf_jax.models.clip_tokenizer import TokenizerFilesError
from fnf_jax.models.convert import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 211
LENGTH = 45  # > relative_attention_max_distance of both configs: the log buckets and the last
TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_heads=4)
CASES = {
    # Few buckets and a short max distance: distances 2..44 cover exact, log-spaced and clipped.
    "relu": dict(TINY, num_layers=3, feed_forward_proj="relu",
                 relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "gated-gelu": dict(TINY, num_layers=2, feed_forward_proj="gated-gelu",
                       relative_attention_num_buckets=12, relative_attention_max_distance=20),
}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def t2n(x) -> np.ndarray:
  return x.detach().float().numpy()


def _inputs(seed: int = 0):
  """Ids [3, LENGTH] and a mask with a full row, a right-padded row and a left-padded row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(3, LENGTH)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 29:] = 0
  mask[2, :7] = 0
  return ids, mask


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  """{case: (folder, torch T5EncoderModel)}."""
  root = tmp_path_factory.mktemp("t5")
  out = {}
  for i, (name, kwargs) in enumerate(CASES.items()):
    torch.manual_seed(i)
    model = transformers.T5EncoderModel(transformers.T5Config(**kwargs)).eval()
    folder = str(root / name)
    model.save_pretrained(folder)
    out[name] = (folder, model)
  return out


def _apply(module):
  @jax.jit
  def run(params, ids, embeds, mask):
    if embeds is None:
      return module.apply({"params": params}, ids, attention_mask=mask)
    return module.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask)
  return run


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_parity(encoders, case):
  folder, model = encoders[case]
  module, params = t5.load(folder)
  assert module.config.is_gated_act == (case != "relu")
  assert module.config.dense_act_fn == model.config.dense_act_fn
  run = _apply(module)
  ids, mask = _inputs()
  tids, tmask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  with torch.no_grad():
    ref_plain = t2n(model(input_ids=tids).last_hidden_state)
    ref_masked = t2n(model(input_ids=tids, attention_mask=tmask).last_hidden_state)
    embeds = np.random.default_rng(1).normal(size=(3, LENGTH, 32)).astype(np.float32)
    ref_embeds = t2n(model(inputs_embeds=torch.from_numpy(embeds),
                           attention_mask=tmask).last_hidden_state)

  out = run(params, ids, None, None)
  assert out.shape == (3, LENGTH, 32)
  assert rel_err(out, ref_plain) <= TOL
  masked = run(params, ids, None, mask)
  assert rel_err(masked, ref_masked) <= TOL
  # The mask matters (rows 1 and 2 change) and the real tokens of each row agree on their own.
  assert rel_err(masked[1:], ref_plain[1:]) > 1e-2
  for row in range(3):
    keep = mask[row] > 0
    assert rel_err(masked[row][keep], ref_masked[row][keep]) <= TOL
  assert rel_err(run(params, None, embeds, mask), ref_embeds) <= TOL
  # embed() is the token lookup that input_ids go through.
  tokens = module.apply({"params": params}, ids, method=t5.T5Encoder.embed)
  np.testing.assert_array_equal(tokens, params["shared"]["embedding"][ids])
  assert rel_err(run(params, None, tokens, mask), ref_masked) <= TOL


def test_inputs_embeds_gradient_and_remat(encoders):
  """d(sum(out * w)) / d(inputs_embeds) as torch autograd gives it, with and without remat."""
  folder, model = encoders["relu"]
  module, params = t5.load(folder)
  _, mask = _inputs()
  rng = np.random.default_rng(2)
  embeds = rng.normal(size=(3, LENGTH, 32)).astype(np.float32)
  weights = rng.normal(size=(3, LENGTH, 32)).astype(np.float32)

  x = torch.from_numpy(embeds).requires_grad_(True)
  out = model(inputs_embeds=x, attention_mask=torch.from_numpy(mask).long()).last_hidden_state
  (out * torch.from_numpy(weights)).sum().backward()
  ref_grad = t2n(x.grad)

  def loss(m, e):
    return jnp.sum(m.apply({"params": params}, inputs_embeds=e, attention_mask=mask) * weights)

  grad = jax.jit(jax.grad(lambda e: loss(module, e)))(embeds)
  assert rel_err(grad, ref_grad) <= TOL
  remat = module.clone(remat=True)
  assert jax.tree.structure(convert.abstract_params(remat, jnp.zeros((1, 1), jnp.int32))) == \
      jax.tree.structure(convert.abstract_params(module, jnp.zeros((1, 1), jnp.int32)))
  grad_remat = jax.jit(jax.grad(lambda e: loss(remat, e)))(embeds)
  assert rel_err(grad_remat, ref_grad) <= TOL


def test_bfloat16_compute(encoders):
  folder, model = encoders["gated-gelu"]
  module, params = t5.load(folder, dtype="bfloat16")
  ids, mask = _inputs()
  with torch.no_grad():
    ref = t2n(model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long()).last_hidden_state)
  out = _apply(module)(params, ids, None, mask)
  assert out.dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == np.float32  # params stay float32
  # bfloat16 keeps 8 mantissa bits: ~0.4% per op, a few percent after 2 layers.
  assert rel_err(out, ref) <= 5e-2


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 16), (12, 20), (64, 256), (16, 16)])
def test_relative_position_buckets(buckets, distance):
  positions = np.arange(-3000, 3001)
  ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.from_numpy(positions), bidirectional=True, num_buckets=buckets,
      max_distance=distance).numpy()
  ours = t5.relative_position_bucket(positions, buckets, distance)
  np.testing.assert_array_equal(ours, ref)
  assert ours.min() == 0 and ours.max() == buckets - 1


def test_conditional_generation_folder(tmp_path):
  """T5ForConditionalGeneration: decoder and lm_head skipped, the same encoder output."""
  torch.manual_seed(3)
  config = transformers.T5Config(**CASES["gated-gelu"], num_decoder_layers=1)
  model = transformers.T5ForConditionalGeneration(config).eval()
  folder = str(tmp_path / "t5_lm")
  model.save_pretrained(folder)
  module, params = t5.load(folder)
  ids, mask = _inputs(seed=4)
  with torch.no_grad():
    ref = t2n(model.get_encoder()(input_ids=torch.from_numpy(ids).long(),
                                  attention_mask=torch.from_numpy(mask).long()).last_hidden_state)
  assert rel_err(_apply(module)(params, ids, None, mask), ref) <= TOL


def _state_dict(folder):
  return convert.read_state_dict(convert.find_weights(folder))


def test_tied_embedding_keys(encoders, tmp_path):
  """shared.weight, encoder.embed_tokens.weight, or both (equal) load the same params."""
  folder, _ = encoders["relu"]
  _, params = t5.load(folder)
  sd = _state_dict(folder)
  assert "shared.weight" in sd and "encoder.embed_tokens.weight" not in sd
  only_alias = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                for k, v in sd.items()}
  both = dict(sd, **{"encoder.embed_tokens.weight": sd["shared.weight"]})
  for name, variant in (("alias", only_alias), ("both", both)):
    other = tmp_path / name
    other.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), other / "config.json")
    convert.write_safetensors(str(other / "model.safetensors"), variant)
    _, loaded = t5.load(str(other))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
  differ = dict(both, **{"encoder.embed_tokens.weight": sd["shared.weight"] + 1})
  with pytest.raises(CheckpointError, match=r"shared\.weight and encoder\.embed_tokens\.weight "
                                            r"in somewhere differ"):
    t5.params_from_state_dict(differ, t5.T5Config.from_dict(CASES["relu"]), where="somewhere")


def test_params_from_prefixed_state_dict(encoders):
  """RAHF's checkpoint keeps its T5 under "t5." beside other modules' keys."""
  folder, _ = encoders["relu"]
  _, params = t5.load(folder)
  sd = {f"t5.{k}": v for k, v in _state_dict(folder).items()}
  sd["vision.patch.weight"] = np.zeros((2, 2), np.float32)
  config = t5.read_config(folder)
  loaded = t5.params_from_state_dict(sd, config, where="rahf.safetensors", prefix="t5.")
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(CheckpointError, match=r"no weights under the prefix 'text\.' in rahf"):
    t5.params_from_state_dict(sd, config, where="rahf.safetensors", prefix="text.")
  # Without the prefix no key is the module's, and the error names them.
  with pytest.raises(CheckpointError, match=r"have no place .*'t5\.encoder\.block\.0"):
    t5.params_from_state_dict(sd, config, where="rahf.safetensors")


def _torch_config(config: t5.T5Config):
  return transformers.T5Config(**dataclasses.asdict(config))


@pytest.mark.parametrize("preset", ["t5-base", "flan-t5-base"])
def test_real_size_presets_parameter_count(preset):
  """The real-size presets build (shapes only) with exactly transformers' parameter count."""
  config = t5.PRESETS[preset]
  abstract = convert.abstract_params(t5.T5Encoder(config), jnp.zeros((1, 1), jnp.int32))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  with torch.device("meta"):  # nothing allocated
    model = transformers.T5EncoderModel(_torch_config(config))
  assert ours == sum(p.numel() for p in model.parameters())  # tied embedding counted once
  assert model.config.dense_act_fn == config.dense_act_fn
  assert model.config.is_gated_act == config.is_gated_act
  if preset == "t5-base":
    assert ours == 109_628_544
    assert (config.d_model, config.d_ff, config.num_layers, config.vocab_size) == (
        768, 3072, 12, 32128)


@pytest.mark.parametrize("proj", ["relu", "gated-gelu", "gated-silu", "gelu", "gated-gelu_new"])
def test_config_from_dict(proj):
  """Fields and derived activation as transformers' T5Config (its config.json round trip)."""
  theirs = transformers.T5Config(**TINY, feed_forward_proj=proj)
  ours = t5.T5Config.from_dict(theirs.to_dict())
  assert ours.feed_forward_proj == proj
  assert (ours.dense_act_fn, ours.is_gated_act) == (theirs.dense_act_fn, theirs.is_gated_act)
  assert (ours.d_model, ours.d_kv, ours.num_heads, ours.pad_token_id, ours.eos_token_id) == (
      32, 8, 4, 0, 1)
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.T5Config(feed_forward_proj="gelu-gated")
  with pytest.raises(ValueError, match="not one of"):
    t5.T5Config(feed_forward_proj="gated-mish")


def test_load_errors(encoders, tmp_path):
  missing = str(tmp_path / "missing")
  with pytest.raises(CheckpointError, match=f"not found: '{missing}'"):
    t5.load(missing)
  folder, _ = encoders["relu"]
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)

  def variant(name, **changes):
    other = tmp_path / name
    shutil.copytree(folder, other)
    with open(other / "config.json", "w") as f:
      json.dump(dict(config, **changes), f)
    return str(other)

  bert = variant("bert", model_type="bert", architectures=["BertModel"])
  with pytest.raises(CheckpointError,
                     match=rf"{bert}/config\.json' has model_type 'bert' \(BertModel\), not 't5'"):
    t5.load(bert)
  wide = variant("wide", d_ff=40)
  with pytest.raises(CheckpointError,
                     match=rf"DenseReluDense\.(wi|wo)\.weight' in {wide} has shape .*expects"):
    t5.load(wide)
  bad_act = variant("bad_act", feed_forward_proj="gated-mish")
  with pytest.raises(CheckpointError, match=rf"{bad_act}/config\.json.*mish"):
    t5.load(bad_act)


# -------------------------------------------------------------------------------- tokenizer

PROMPTS = [
    "a photo of a red circle",
    "two cats sitting on the table!",
    "",
    "  A   Man holding   a sign that says \"hello, world\" ",
    "portrait of a woman, high quality, with three fingers on each hand",
    "an unusual wörd ü and </s> in the middle",
]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("t5_tok") / "tokenizer")
  t5_tokenizer.write_tiny_tokenizer(folder)
  return folder


def test_tokenizer_matches_transformers(tokenizer_folder):
  ours = t5_tokenizer.load(tokenizer_folder)
  ref = transformers.T5TokenizerFast.from_pretrained(tokenizer_folder)
  assert (ours.pad_id, ours.eos_id, ours.unk_id) == (0, 1, 2)
  assert (ours.pad_id, ours.eos_id) == (ref.pad_token_id, ref.eos_token_id)
  assert ours.vocab_size == len(ref)
  for prompt in PROMPTS:
    ids = ours.encode(prompt)
    assert ids == ref(prompt).input_ids
    assert ids[-1] == ours.eos_id
  assert ours.encode("a photo of a red circle") == [
      ref.convert_tokens_to_ids("\u2581" + w) for w in "a photo of a red circle".split()] + [1]
  assert ours.unk_id in ours.encode(PROMPTS[-1])  # characters outside the tiny alphabet
  lengths = [len(ours.encode(p)) for p in PROMPTS]
  for max_length in (1, 2, 5, 9, 64):
    ids, mask = ours(PROMPTS, max_length)
    want = ref(PROMPTS, padding="max_length", max_length=max_length, truncation=True)
    assert ids.dtype == mask.dtype == np.int32
    assert ids.shape == mask.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(ids, np.asarray(want.input_ids))
    np.testing.assert_array_equal(mask, np.asarray(want.attention_mask))
    # Truncated rows keep </s> last; padded rows are <pad> where the mask is 0.
    for row, n in zip(range(len(PROMPTS)), lengths):
      assert ids[row, min(n, max_length) - 1] == ours.eos_id
      assert (ids[row][mask[row] == 0] == ours.pad_id).all()
  ids, _ = ours("a photo", 4)  # one prompt as a string
  assert ids.tolist() == [[3, ours.encode("photo")[0], 1, 0]]


def test_tokenizer_errors(tmp_path):
  spiece_only = tmp_path / "spiece_only"
  spiece_only.mkdir()
  (spiece_only / "spiece.model").write_bytes(b"\0")
  with pytest.raises(TokenizerFilesError) as info:
    t5_tokenizer.load(str(spiece_only))
  assert isinstance(info.value, CheckpointError)  # the T5 folder's loaders report one type
  message = str(info.value)
  for part in (str(spiece_only), "tokenizer.json", "spiece.model", "sentencepiece",
               f"huggingface-cli download google-t5/t5-base tokenizer.json --local-dir "
               f"{spiece_only}", "save_pretrained"):
    assert part in message, part
  with pytest.raises(TokenizerFilesError, match="folder not found"):
    t5_tokenizer.load(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="max_length"):
    tok = tmp_path / "tok"
    t5_tokenizer.write_tiny_tokenizer(str(tok))
    t5_tokenizer.load(str(tok))(["a"], 0)
