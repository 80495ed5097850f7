"""Flax CLIP against transformers' PyTorch CLIP on tiny random models saved with save_pretrained.

Tolerance: relative error ||a - b|| / ||b|| <= 1e-4 in float32 (conftest forces "highest"
matmul precision), except where a comment says otherwise.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax.models import clip, clip_tokenizer
from fnf_jax.models.convert import CheckpointError
from tokenizer_fixture import write_tiny_clip_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 1000
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                 vocab_size=VOCAB, max_position_embeddings=77, projection_dim=24,
                 bos_token_id=0, pad_token_id=1)
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                   num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=24)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def t2n(x) -> np.ndarray:
  return x.detach().float().numpy()


def _random_ids(eos: int, batch: int = 3, length: int = 77, seed: int = 0) -> np.ndarray:
  """Random ids over the whole vocabulary with eos at varying positions (some after it too).

  Ids above eos make argmax(ids) and "first eos" pick different positions, so the test tells
  the two pooling rules apart.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(batch, length))
  ids[ids == eos] = 3
  for row, pos in zip(ids, (5, 40, 76)[:batch]):
    row[pos] = eos
    row[pos + 1:] = eos if pos % 2 else row[pos + 1:]  # eos-padded rows and junk-after rows
  return ids.astype(np.int32)


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
  """{case: folder}: CLIPTextModel (quick_gelu, legacy eos 2) and WithProjection (gelu, eos)."""
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("clip_text")
  cases = {
      "plain_legacy_eos": (transformers.CLIPTextModel, "quick_gelu", 2),
      "plain_real_eos": (transformers.CLIPTextModel, "quick_gelu", 618),
      "projection_real_eos": (transformers.CLIPTextModelWithProjection, "gelu", 618),
      "projection_legacy_eos": (transformers.CLIPTextModelWithProjection, "gelu", 2),
  }
  out = {}
  for name, (cls, act, eos) in cases.items():
    config = transformers.CLIPTextConfig(**TINY_TEXT, hidden_act=act, eos_token_id=eos)
    model = cls(config).eval()
    folder = str(root / name)
    model.save_pretrained(folder)
    out[name] = (folder, model)
  return out


@pytest.mark.parametrize("case", ["plain_legacy_eos", "plain_real_eos", "projection_real_eos",
                                  "projection_legacy_eos"])
def test_text_encoder_parity(text_encoders, case):
  folder, model = text_encoders[case]
  eos = model.config.eos_token_id
  ids = _random_ids(618)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids).long(), output_hidden_states=True)

  module, params = clip.load_text_encoder(folder)
  assert module.with_projection == case.startswith("projection")
  assert module.config.eos_token_id == eos
  out = jax.jit(module.apply)({"params": params}, ids)

  assert rel_err(out.last_hidden_state, t2n(ref.last_hidden_state)) <= TOL
  assert len(out.hidden_states) == len(ref.hidden_states) == TINY_TEXT["num_hidden_layers"] + 1
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert rel_err(ours, t2n(theirs)) <= TOL
  # hidden_states[-1] is pre final LN (transformers' convention that SDXL relies on).
  assert rel_err(out.hidden_states[-1], t2n(ref.last_hidden_state)) > 1e-2
  if module.with_projection:
    assert rel_err(out.text_embeds, t2n(ref.text_embeds)) <= TOL
    pooled_ref = model.text_model(torch.from_numpy(ids).long()).pooler_output
  else:
    assert out.text_embeds is None
    pooled_ref = ref.pooler_output
  assert rel_err(out.pooled, t2n(pooled_ref)) <= TOL
  # The pooling position really differs between the two rules on these ids.
  legacy = np.argmax(ids, -1)
  first_eos = np.argmax(ids == 618, -1)
  assert (legacy != first_eos).all()
  expected = legacy if eos == 2 else first_eos
  np.testing.assert_array_equal(clip.pool_index(jnp.asarray(ids), eos), expected)


def test_text_encoder_with_tokenizer_and_bf16(text_encoders, tmp_path):
  """Fixture tokenizer -> SD-style ids -> encoder; bfloat16 compute stays close to float32."""
  folder, model = text_encoders["plain_legacy_eos"]
  write_tiny_clip_tokenizer(str(tmp_path))
  ids = clip_tokenizer.load(str(tmp_path))(["a photo of a red circle", "two cats!", ""])
  with torch.no_grad():
    ref = model(torch.from_numpy(ids).long())
  module, params = clip.load_text_encoder(folder)
  out = jax.jit(module.apply)({"params": params}, ids)
  assert rel_err(out.pooled, t2n(ref.pooler_output)) <= TOL
  module16 = module.clone(dtype=jnp.bfloat16)
  out16 = jax.jit(module16.apply)({"params": params}, ids)
  assert out16.last_hidden_state.dtype == jnp.bfloat16
  # bfloat16 keeps 8 mantissa bits: ~0.4% per op, a few percent after 5 layers.
  assert rel_err(out16.last_hidden_state, t2n(ref.last_hidden_state)) <= 5e-2


def test_text_encoder_errors(tmp_path, text_encoders):
  with pytest.raises(CheckpointError, match="not found"):
    clip.load_text_encoder(str(tmp_path / "missing"))
  folder, _ = text_encoders["plain_real_eos"]
  # A config that disagrees with the weights names the key and both shapes.
  import json, shutil  # pylint: disable=g-import-not-at-top,multiple-imports
  bad = str(tmp_path / "bad")
  shutil.copytree(folder, bad)
  with open(os.path.join(bad, "config.json")) as f:
    config = json.load(f)
  config["intermediate_size"] = 40
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match=r"mlp\.fc1\.(weight|bias).* has shape \(37,.*expects \(40,"):
    clip.load_text_encoder(bad)


# ------------------------------------------------------------------------------ full CLIPModel


def _features(out) -> np.ndarray:
  # transformers 5 returns an output object whose pooler_output is projected; 4 a tensor.
  return t2n(getattr(out, "pooler_output", out))


def _nchw(pixels) -> "torch.Tensor":
  return torch.from_numpy(np.asarray(pixels, np.float32).transpose(0, 3, 1, 2).copy())


def _normalise(images: np.ndarray) -> np.ndarray:
  return (images - np.asarray(clip.IMAGE_MEAN, np.float32)) / np.asarray(clip.IMAGE_STD,
                                                                         np.float32)


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
  """A tiny transformers CLIPModel folder with the fixture tokenizer in `tokenizer/`."""
  torch.manual_seed(1)
  config = transformers.CLIPConfig(
      # 2 text layers here (the text-encoder tests above use 5): compile time on 2 shared CPUs.
      text_config=dict(TINY_TEXT, num_hidden_layers=2, hidden_act="quick_gelu", eos_token_id=618),
      vision_config=dict(TINY_VISION, hidden_act="quick_gelu"), projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  folder = str(tmp_path_factory.mktemp("clip") / "model")
  model.save_pretrained(folder)
  write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
  return folder, model, clip.load(folder)


def _images(batch, size, seed=0) -> np.ndarray:
  # Smooth images (low-frequency patterns) like generated ones, not white noise.
  rng = np.random.default_rng(seed)
  y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  imgs = [0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y
                                          + rng.uniform(0, 1, 3)[:, None, None])).transpose(1, 2, 0)
          for _ in range(batch)]
  return np.clip(np.stack(imgs), 0, 1).astype(np.float32)


def test_image_features_parity(clip_model):
  _, model, ours = clip_model
  images = _images(3, 32)  # already image_size: no resampling
  with torch.no_grad():
    pixels = _nchw(_normalise(images))
    ref = _features(model.get_image_features(pixel_values=pixels))
    ref_tokens = t2n(model.vision_model(pixel_values=pixels).last_hidden_state)
  assert rel_err(ours.encode_image(images), ref) <= TOL
  out = jax.jit(ours.vision_outputs)(ours.params, images)
  assert out.last_hidden_state.shape == (3, 1 + (32 // 8) ** 2, 32)
  assert rel_err(out.last_hidden_state, ref_tokens) <= TOL


def test_text_features_parity(clip_model):
  folder, model, ours = clip_model
  prompts = ["a photo of a red circle", "A dog holding a sign that says 123!", ""]
  hf_tok = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
  ids = hf_tok(prompts, padding="max_length", max_length=hf_tok.model_max_length,
               truncation=True, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    ref = _features(model.get_text_features(input_ids=ids))
  np.testing.assert_array_equal(ours.tokenize(prompts), ids.numpy())
  assert rel_err(ours.encode_text(prompts), ref) <= TOL


def test_resized_images(clip_model):
  _, model, ours = clip_model
  images = _images(2, 72, seed=3)  # SD-sized images are resized to image_size (32) inside
  resized = np.asarray(jax.image.resize(images, (2, 32, 32, 3), method="bicubic"))
  with torch.no_grad():
    ref = _features(model.get_image_features(pixel_values=_nchw(_normalise(resized))))
    # torch's bicubic (a=-0.75; antialias=True switches to PIL's a=-0.5 filter scaled to the
    # downsampling factor, which is what jax.image.resize does by default).
    torch_plain, torch_aa = (
        torch.nn.functional.interpolate(_nchw(images), size=(32, 32), mode="bicubic",
                                        align_corners=False, antialias=aa) for aa in (False, True))
    feats = {aa: _features(model.get_image_features(pixel_values=_nchw(
        _normalise(t.numpy().transpose(0, 2, 3, 1))))) for aa, t in ((False, torch_plain),
                                                                     (True, torch_aa))}
  got = np.asarray(ours.encode_image(images))
  # Same pixels into both models: float32 parity.
  assert rel_err(got, ref) <= TOL
  # Against torch's own resampling (reported with -s, and bounded). jax.image.resize's bicubic
  # antialiases when shrinking (Keys a=-0.5 kernel stretched by the scale factor), which is
  # torch's interpolate(mode="bicubic", antialias=True) and PIL's bicubic, i.e. what CLIP's
  # image processor applies: measured 1e-7 apart (float rounding), so 1e-5 / 1e-4 bounds.
  # torch's default antialias=False (a=-0.75, no prefilter) aliases when shrinking 72 -> 32:
  # a few 1e-3 apart on these smooth images, more on detailed ones, hence only a loose bound.
  pix_aa = rel_err(resized, torch_aa.numpy().transpose(0, 2, 3, 1))
  pix_plain = rel_err(resized, torch_plain.numpy().transpose(0, 2, 3, 1))
  feat_aa, feat_plain = rel_err(got, feats[True]), rel_err(got, feats[False])
  print(f"\njax bicubic vs torch bicubic antialias=True: pixels {pix_aa:.2e}, features "
        f"{feat_aa:.2e}; antialias=False: pixels {pix_plain:.2e}, features {feat_plain:.2e}")
  assert pix_aa <= 1e-5 and feat_aa <= 1e-4
  assert pix_plain <= 3e-2


def test_preprocess_crop_and_identity():
  square = _images(1, 32)
  np.testing.assert_allclose(clip.preprocess_images(square, 32), _normalise(square), rtol=1e-6,
                             atol=1e-6)
  wide = np.concatenate([np.zeros((1, 32, 8, 3), np.float32), square,
                         np.ones((1, 32, 8, 3), np.float32)], axis=2)  # 32 x 48
  np.testing.assert_allclose(clip.preprocess_images(wide, 32), _normalise(square), rtol=1e-6,
                             atol=1e-6)


def test_gradients_through_image_features(clip_model):
  _, _, ours = clip_model
  images = jnp.asarray(_images(2, 48))  # through the resize too

  # One compile for both: d/d(images), and d/d(layer outputs) through the perturbations, as
  # Grad-CAM needs.
  @jax.jit
  @functools.partial(jax.grad, argnums=(0, 1))
  def grads(images, perturbations):
    out = ours.vision_outputs(ours.params, images, perturbations)
    feats = out.image_embeds
    return jnp.sum(feats / jnp.linalg.norm(feats, axis=-1, keepdims=True))

  image_grads, layer_grads = grads(images, ours.vision_perturbations(2))
  assert image_grads.shape == images.shape and bool(jnp.isfinite(image_grads).all())
  assert float(jnp.abs(image_grads).max()) > 0
  n = TINY_VISION["num_hidden_layers"]
  layer_grads = layer_grads["vision_model"]["encoder"]
  assert set(layer_grads) == {f"hidden_states_{i}" for i in range(1, n + 1)}
  assert layer_grads[f"hidden_states_{n}"].shape == (2, 1 + (32 // 8) ** 2, 32)
  # The pooled class token of the last layer depends on the patch tokens of the layer before
  # it, not on the last layer's own patch tokens.
  assert float(jnp.abs(layer_grads[f"hidden_states_{n}"][:, 1:]).max()) == 0
  assert float(jnp.abs(layer_grads[f"hidden_states_{n - 1}"][:, 1:]).max()) > 0


def _to_openclip(sd: dict[str, np.ndarray], prefix_hf: str, prefix_oc: str, out: dict) -> None:
  """One tower's encoder layers in OpenCLIP layout (fused qkv, c_fc / c_proj, ln_1 / ln_2)."""
  n = len({k.split(".")[3] for k in sd if k.startswith(prefix_hf)})
  for i in range(n):
    hf, oc = f"{prefix_hf}{i}.", f"{prefix_oc}{i}."
    for leaf in ("weight", "bias"):
      out[oc + f"attn.in_proj_{leaf}"] = np.concatenate(
          [sd[hf + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"], axis=0)
      out[oc + f"attn.out_proj.{leaf}"] = sd[hf + f"self_attn.out_proj.{leaf}"]
      out[oc + f"ln_1.{leaf}"] = sd[hf + f"layer_norm1.{leaf}"]
      out[oc + f"ln_2.{leaf}"] = sd[hf + f"layer_norm2.{leaf}"]
      out[oc + f"mlp.c_fc.{leaf}"] = sd[hf + f"mlp.fc1.{leaf}"]
      out[oc + f"mlp.c_proj.{leaf}"] = sd[hf + f"mlp.fc2.{leaf}"]


def hf_to_openclip(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers CLIPModel state dict -> OpenCLIP's (written from OpenCLIP's module layout)."""
  out = {
      "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
      "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
      "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
      "visual.proj": sd["visual_projection.weight"].T,  # used as x @ proj
      "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
      "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
      "text_projection": sd["text_projection.weight"].T,
      "logit_scale": sd["logit_scale"],
      "attn_mask": np.triu(np.full((77, 77), -np.inf, np.float32), 1),  # a buffer, skipped
  }
  for oc, hf in (("visual.ln_pre", "vision_model.pre_layrnorm"),
                 ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
    out[oc + ".weight"], out[oc + ".bias"] = sd[hf + ".weight"], sd[hf + ".bias"]
  _to_openclip(sd, "vision_model.encoder.layers.", "visual.transformer.resblocks.", out)
  _to_openclip(sd, "text_model.encoder.layers.", "transformer.resblocks.", out)
  return out


def test_openclip_layout(clip_model, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  folder, model, ours = clip_model
  sd = {k: t2n(v) for k, v in model.state_dict().items()}
  path = str(tmp_path / "open_clip_pytorch_model.safetensors")
  save_file({k: np.array(v, order="C") for k, v in hf_to_openclip(sd).items()}, path)
  # Tiny widths break OpenCLIP's head width of 64, so the config is given; OpenCLIP pools at
  # argmax(ids), i.e. transformers' legacy eos_token_id=2.
  with pytest.raises(CheckpointError, match="match no preset"):
    clip.load(path)
  config = clip.CLIPConfig.from_dict(model.config.to_dict())
  config = clip.dataclasses.replace(
      config, text_config=clip.dataclasses.replace(config.text_config, eos_token_id=2))
  loaded = clip.load(str(tmp_path), config=config,
                     tokenizer=os.path.join(folder, "tokenizer"))
  jax.tree.map(np.testing.assert_array_equal, loaded.params, ours.params)
  images = _images(2, 32)
  np.testing.assert_array_equal(loaded.encode_image(images), ours.encode_image(images))
  # The fixture's eos is its largest id, so argmax pooling picks the same token.
  prompts = ["a photo of a red circle", "two cats"]
  np.testing.assert_allclose(loaded.encode_text(prompts), ours.encode_text(prompts), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("name", sorted(clip.PRESETS))
def test_presets_match_transformers_configs(name):
  """Presets = the published configs; config_from_openclip infers them from OpenCLIP shapes."""
  published = {  # config.json of openai/clip-vit-base-patch32, -large-patch14, laion ViT-H-14
      "ViT-B-32": ((512, 2048, 8, 12), (768, 3072, 12, 12, 32), 512, "quick_gelu"),
      "ViT-L-14": ((768, 3072, 12, 12), (1024, 4096, 16, 24, 14), 768, "quick_gelu"),
      "ViT-H-14": ((1024, 4096, 16, 24), (1280, 5120, 16, 32, 14), 1024, "gelu"),
  }[name]
  (tw, ti, th, tl), (vw, vi, vh, vl, patch), proj, act = published
  keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
  hf_config = transformers.CLIPConfig(
      text_config=dict(zip(keys, (tw, ti, th, tl)), hidden_act=act, eos_token_id=2,
                       projection_dim=proj),
      vision_config=dict(zip(keys, (vw, vi, vh, vl)), patch_size=patch, hidden_act=act,
                         projection_dim=proj),
      projection_dim=proj)
  assert clip.CLIPConfig.from_dict(hf_config.to_dict()) == clip.PRESETS[name]
  # Shapes only: a meta-device model allocates nothing.
  with torch.device("meta"):
    model = transformers.CLIPModel(hf_config)
  shapes = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in model.state_dict().items()}
  assert clip.config_from_openclip(hf_to_openclip(shapes)) == clip.PRESETS[name]


def test_text_encoder_transformers4_layout(text_encoders, tmp_path):
  """SD checkpoints (transformers 4) prefix CLIPTextModel keys with "text_model." and may carry
  the position_ids buffer; both layouts load to the same params."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top

  folder, _ = text_encoders["plain_real_eos"]
  old = str(tmp_path / "v4")
  shutil.copytree(folder, old)
  sd = load_file(os.path.join(folder, "model.safetensors"))
  sd = {"text_model." + k: v for k, v in sd.items()}
  sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  save_file(sd, os.path.join(old, "model.safetensors"))
  module, params = clip.load_text_encoder(folder)
  module_old, params_old = clip.load_text_encoder(old, remat=True)
  assert module_old.clone(remat=False) == module
  jax.tree.map(np.testing.assert_array_equal, params_old, params)


def test_image_features_parity_at_224_and_from_sd_sized_images(tmp_path):
  """The real CLIPs' input size: 224² passes through untouched; a 512² SD image is resized
  (jax bicubic, antialiased) inside encode_image, and matches transformers fed those pixels."""
  torch.manual_seed(2)
  config = transformers.CLIPConfig(
      text_config=dict(TINY_TEXT, num_hidden_layers=1, eos_token_id=618),
      vision_config=dict(TINY_VISION, image_size=224, patch_size=32, num_hidden_layers=1),
      projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(str(tmp_path / "model"))
  write_tiny_clip_tokenizer(str(tmp_path / "model" / "tokenizer"))
  ours = clip.load(str(tmp_path / "model"))
  native, sd = _images(2, 224, seed=5), _images(1, 512, seed=6)
  resized = np.asarray(jax.image.resize(sd, (1, 224, 224, 3), method="bicubic"))
  with torch.no_grad():
    ref_native = _features(model.get_image_features(pixel_values=_nchw(_normalise(native))))
    ref_sd = _features(model.get_image_features(pixel_values=_nchw(_normalise(resized))))
  assert rel_err(ours.encode_image(native), ref_native) <= TOL
  assert rel_err(ours.encode_image(sd), ref_sd) <= TOL
