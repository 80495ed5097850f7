"""The CLIP rewards (q16, laion_nsfw, laion_aesthetic, clip_score, zero_shot_safety) on a tiny
random CLIP saved with transformers' save_pretrained.

Head weights are written in their PUBLISHED formats (Q16's pickle, the aesthetic predictor's
torch state dict, the NSFW detector's Keras layer weights and its authors' torch port), converted
with tools/, and the rewards' scores are checked against independent numpy / torch computations
of the published heads on the same CLIP embeddings (relative 1e-5). Where the CLIP itself is
part of the comparison (text features from transformers' PyTorch CLIP) the CLIP parity
tolerance of test_clip.py (1e-4) applies.
"""

import dataclasses
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fnf_jax.models import clip as clip_lib
from fnf_jax.models.convert import CheckpointError
from fnf_jax.rewards import clip_score, registry
from tokenizer_fixture import write_tiny_clip_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tools"))
import convert_laion_heads  # noqa: E402  pylint: disable=g-import-not-at-top
import convert_q16  # noqa: E402  pylint: disable=g-import-not-at-top

from configs import focus_n_fix  # noqa: E402  pylint: disable=g-import-not-at-top

DIM = 24  # the tiny CLIP's projection width
NEW = ("q16", "laion_nsfw", "laion_aesthetic", "clip_score", "zero_shot_safety")


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(folder, torch CLIPModel, our Clip): 1 text layer, 2 vision layers, tokenizer inside."""
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                       num_hidden_layers=1, vocab_size=619, max_position_embeddings=77,
                       eos_token_id=2, bos_token_id=617, pad_token_id=618),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, image_size=32, patch_size=8),
      projection_dim=DIM)
  model = transformers.CLIPModel(config).eval()
  folder = str(tmp_path_factory.mktemp("clip") / "model")
  model.save_pretrained(folder)
  write_tiny_clip_tokenizer(folder)
  return folder, model, clip_lib.load(folder)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return rng.uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def embeds(tiny, images):
  """Our CLIP's image embeddings, L2-normalised in float64: the heads' input."""
  e = np.asarray(tiny[2].encode_image(images), np.float64)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def config(name, folder, **fields) -> ml_collections.ConfigDict:
  """The configs' reward block for `name` (every field its code reads) on the tiny CLIP, in
  float32 without remat: the comparisons below are against float32 references."""
  c = focus_n_fix.clip_reward(name)
  c.update(dict(clip_path=folder, dtype="float32", remat=False, **fields))
  return c


def test_registry_lists_new_rewards():
  assert set(NEW) <= set(registry.names())


def test_q16_from_pickle(tiny, images, embeds, tmp_path):
  folder = tiny[0]
  prompts = np.random.default_rng(1).normal(size=(2, DIM)).astype(np.float32)
  src, dst = str(tmp_path / "prompts.p"), str(tmp_path / "q16.safetensors")
  with open(src, "wb") as f:
    pickle.dump(prompts, f)  # Q16 publishes the [2, D] array pickled
  convert_q16.main([src, dst])
  reward = registry.build(config("q16", folder, weights=dst))
  got = jax.jit(reward.score)(reward.params, images, None)

  p = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)
  logits = 100.0 * embeds @ p.T.astype(np.float64)
  expected = np.exp(logits[:, 0]) / np.exp(logits).sum(-1)  # p(non-inappropriate)
  assert rel_err(got, expected) <= 1e-5
  assert "text_model" not in reward.params["clip"]  # image-only heads carry no text tower
  # A torch tensor in the pickle and a .npy file read the same.
  with open(src, "wb") as f:
    pickle.dump(torch.from_numpy(prompts).half(), f)
  half = convert_q16.convert(src, str(tmp_path / "half.safetensors"))
  np.testing.assert_array_equal(half, prompts.astype(np.float16).astype(np.float32))
  np.save(tmp_path / "q16.npy", prompts)
  npy = registry.build(config("q16", folder, weights=str(tmp_path / "q16.npy")))
  np.testing.assert_array_equal(npy.params["head"]["prompts"], reward.params["head"]["prompts"])


def test_laion_aesthetic_from_torch_state_dict(tiny, images, embeds, tmp_path):
  torch.manual_seed(2)
  # The published module layout (768->1024->128->64->16->1 there), with tiny widths.
  mlp = torch.nn.Sequential(
      torch.nn.Linear(DIM, 40), torch.nn.Dropout(0.2), torch.nn.Linear(40, 16),
      torch.nn.Dropout(0.2), torch.nn.Linear(16, 12), torch.nn.Dropout(0.1),
      torch.nn.Linear(12, 6), torch.nn.Linear(6, 1)).eval()
  src, dst = str(tmp_path / "aesthetic.pth"), str(tmp_path / "aesthetic.safetensors")
  torch.save({"layers." + k: v for k, v in mlp.state_dict().items()}, src)
  convert_laion_heads.main(["aesthetic", src, dst])
  reward = registry.build(config("laion_aesthetic", folder=tiny[0], weights=dst))
  got = jax.jit(reward.score)(reward.params, images, None)
  with torch.no_grad():
    expected = mlp.double()(torch.from_numpy(embeds))[:, 0].numpy()
  assert rel_err(got, expected) <= 1e-5


def _nsfw_numpy(layers, embeds):
  """The NSFW head in float64 from Keras-style weights: Normalization, Dense+ReLU..., sigmoid."""
  (mean, var, _), *dense = [w for w in layers if w]
  x = (embeds - mean.reshape(-1)) / np.sqrt(var.reshape(-1))
  for i, (kernel, bias) in enumerate(dense):
    x = x @ kernel + bias
    x = np.maximum(x, 0) if i + 1 < len(dense) else x
  return 1.0 - 1.0 / (1.0 + np.exp(-x[:, 0]))  # 1 - p(nsfw)


def test_laion_nsfw_from_keras_weights_and_torch_port(tiny, images, embeds, tmp_path):
  rng = np.random.default_rng(3)
  sizes = [DIM, 8, 32, 16, 1]  # 768 -> 64 -> 512 -> 256 -> 1 there
  dense = [[rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32),
            rng.normal(0, 0.1, b).astype(np.float32)] for a, b in zip(sizes, sizes[1:])]
  norm = [rng.normal(0, 0.02, (1, DIM)).astype(np.float32),
          rng.uniform(0.5, 2, (1, DIM)).astype(np.float32) * 1e-3, np.float32(1000)]
  # model.layers of the AutoKeras model: input, cast, normalization, dense, relu, dense, relu,
  # dense, relu, dense, sigmoid (get_weights() of weightless layers is []).
  layers = [[], [], norm, dense[0], [], dense[1], [], dense[2], [], dense[3], []]
  keras_dst = str(tmp_path / "nsfw_keras.safetensors")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(convert_laion_heads.nsfw_from_keras_layers(layers), keras_dst)
  reward = registry.build(config("laion_nsfw", folder=tiny[0], weights=keras_dst))
  got = jax.jit(reward.score)(reward.params, images, None)
  expected = _nsfw_numpy(layers, embeds)
  assert rel_err(got, expected) <= 1e-5

  # The authors' PyTorch port (models/clip_ViT-L-14_openai_binary_nsfw_head.pth): same numbers.
  sd = {"norm.mean": norm[0][0], "norm.variance": norm[1][0]}
  for i, (kernel, bias) in enumerate(dense, start=1):
    sd[f"linear_{i}.weight"], sd[f"linear_{i}.bias"] = kernel.T.copy(), bias
  src, dst = str(tmp_path / "nsfw.pth"), str(tmp_path / "nsfw.safetensors")
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, src)
  convert_laion_heads.main(["nsfw", src, dst])
  ported = registry.build(config("laion_nsfw", folder=tiny[0], weights=dst))
  jax.tree.map(np.testing.assert_array_equal, ported.params["head"], reward.params["head"])


def test_clip_score(tiny, images):
  folder, model, ours = tiny
  prompts = ["a photo of a red circle", "two cats", "a dog holding a sign"]
  ids = ours.tokenize(prompts)
  reward = registry.build(config("clip_score", folder, prompt_tokenizer=folder))
  got = jax.jit(reward.score)(reward.params, images, ids[None])  # [E=1, B, 77] as the pipeline
  with torch.no_grad():
    pixels = torch.from_numpy(np.asarray(ours.preprocess(images)).transpose(0, 3, 1, 2).copy())
    img = model.get_image_features(pixel_values=pixels)
    txt = model.get_text_features(input_ids=torch.from_numpy(ids).long())
    img, txt = (getattr(t, "pooler_output", t).double().numpy() for t in (img, txt))
  cos = np.sum(img * txt, -1) / np.linalg.norm(img, axis=-1) / np.linalg.norm(txt, axis=-1)
  np.testing.assert_allclose(got, 2.5 * np.maximum(cos, 0), rtol=1e-4, atol=1e-6)
  # A random CLIP may give cos < 0 (score 0) everywhere: a negated text projection (params are
  # an argument) flips every cosine, so one of the two runs checks the values above 0.
  flipped = jax.tree_util.tree_map_with_path(
      lambda path, x: -x if "text_projection" in jax.tree_util.keystr(path) else x,
      reward.params)
  got_flipped = jax.jit(reward.score)(flipped, images, ids[None])
  np.testing.assert_allclose(got_flipped, 2.5 * np.maximum(-cos, 0), rtol=1e-4, atol=1e-6)
  assert (np.asarray(got) + np.asarray(got_flipped) > 0).all()
  np.testing.assert_allclose(jax.jit(reward.score)(reward.params, images, ids), got, rtol=1e-6)

  # A pipeline tokenizer with another vocabulary than the CLIP's text tower is refused.
  other = dataclasses.replace(ours.config, text_config=dataclasses.replace(
      ours.config.text_config, vocab_size=49408))
  mismatched = clip_lib.Clip(module=ours.module.clone(config=other), params=ours.params)
  with pytest.raises(ValueError, match=r"619 tokens.*embeds 49408"):
    clip_score.check_tokenizer(config("clip_score", folder, prompt_tokenizer=folder), mismatched)


def test_zero_shot_safety(tiny, images):
  folder, model, ours = tiny
  safe, unsafe = ["a photo of a cat", "a blue square"], ["a red circle"]
  reward = registry.build(config("zero_shot_safety", folder, safe_prompts=safe,
                                 unsafe_prompts=unsafe))
  got = jax.jit(reward.score)(reward.params, images, None)
  with torch.no_grad():
    pixels = torch.from_numpy(np.asarray(ours.preprocess(images)).transpose(0, 3, 1, 2).copy())
    img = model.get_image_features(pixel_values=pixels)
    txt = model.get_text_features(input_ids=torch.from_numpy(ours.tokenize(safe + unsafe)).long())
    img, txt = (getattr(t, "pooler_output", t).double().numpy() for t in (img, txt))
    scale = float(model.logit_scale.exp())
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  logits = scale * img @ txt.T
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  assert rel_err(got, p[:, :2].sum(-1)) <= 1e-4


@pytest.mark.parametrize("name,method", [("q16", "gradcam"), ("laion_aesthetic", "gradxinput")])
def test_heatmaps(tiny, tmp_path, name, method):
  """Both saliency methods through a built reward: [B, H, W] of the input, in [0, 1], jittable
  (non-square SD-sized inputs are centre-cropped and resized inside)."""
  rng = np.random.default_rng(4)
  if name == "q16":
    weights = str(tmp_path / "q16.npy")
    np.save(weights, rng.normal(size=(2, DIM)).astype(np.float32))
  else:
    weights = str(tmp_path / "aesthetic.safetensors")
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({"dense_0.kernel": rng.normal(size=(DIM, 4)).astype(np.float32),
               "dense_0.bias": np.zeros(4, np.float32),
               "dense_1.kernel": rng.normal(size=(4, 1)).astype(np.float32),
               "dense_1.bias": np.zeros(1, np.float32)}, weights)
  reward = registry.build(config(name, tiny[0], weights=weights, saliency=method))
  imgs = jnp.asarray(rng.uniform(0, 1, (2, 40, 48, 3)), jnp.float32)
  heat = np.asarray(jax.jit(reward.heatmap)(reward.params, imgs, None))
  assert heat.shape == (2, 40, 48) and np.isfinite(heat).all()
  assert heat.min() >= 0 and np.allclose(heat.max(axis=(1, 2)), 1.0)
  if method == "gradcam":  # outside CLIP's centre crop (4 columns each side) there is no cam
    assert heat[:, :, :4].max() == 0 and heat[:, :, -4:].max() == 0


def test_missing_weights_say_where_and_how(tiny, tmp_path):
  missing = str(tmp_path / "nowhere" / "head.safetensors")
  for name, hint in (("q16", "tools/convert_q16.py"),
                     ("laion_nsfw", "tools/convert_laion_heads.py nsfw"),
                     ("laion_aesthetic", "tools/convert_laion_heads.py aesthetic")):
    with pytest.raises(CheckpointError) as err:
      registry.build(config(name, tiny[0], weights=missing))
    assert missing in str(err.value) and hint in str(err.value) and "https://" in str(err.value)
  with pytest.raises(CheckpointError, match="huggingface-cli download openai/clip-vit-large"):
    registry.build(config("clip_score", str(tmp_path / "no_clip")))


def test_embedding_size_mismatch_names_the_clip(tiny, tmp_path):
  weights = str(tmp_path / "q16_l14.npy")
  np.save(weights, np.ones((2, 768), np.float32))
  with pytest.raises(ValueError, match=r"takes 768-d embeddings \(CLIP ViT-L/14\).*gives 24-d"):
    registry.build(config("q16", tiny[0], weights=weights))
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  head = str(tmp_path / "aesthetic_h14.safetensors")
  save_file({"dense_0.kernel": np.ones((1024, 1), np.float32),
             "dense_0.bias": np.zeros(1, np.float32)}, head)
  with pytest.raises(ValueError, match=r"1024-d embeddings \(CLIP ViT-H/14\)"):
    registry.build(config("laion_aesthetic", tiny[0], weights=head))
