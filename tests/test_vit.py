"""Flax ViT against transformers' PyTorch ViTModel on tiny random models saved with save_pretrained.

Tolerance: relative error ||a - b|| / ||b|| <= 1e-4 in float32 (conftest forces "highest"
matmul precision).
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax.models import vit
from fnf_jax.models.convert import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            image_size=32, patch_size=8)
# Another activation, no q/k/v bias, another eps, 3 layers and a pooler of another width.
VARIANT = dict(TINY, num_hidden_layers=3, hidden_act="quick_gelu", qkv_bias=False,
               layer_norm_eps=1e-6, pooler_output_size=24)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def t2n(x) -> np.ndarray:
  return x.detach().float().numpy()


def _nchw(pixels: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


def _pixels(batch, h, w, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)


def _randomise(model, seed):
  """O(1) weights in place of transformers' 0.02 init, so that attention is far from uniform
  and the norms' scales and biases matter: a wrong wiring shows in the outputs."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.2 * noise if "layernorm" in name and name.endswith("weight") else 0.3 * noise)
  return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{case: (folder, torch model)}: ViTModel with and without a pooler, the variant (pooler),
  and a ViTForImageClassification (keys under "vit.", a classifier, no pooler)."""
  root = tmp_path_factory.mktemp("vit")
  cases = {
      "plain": (transformers.ViTModel, TINY, dict(add_pooling_layer=False)),
      "pooler": (transformers.ViTModel, TINY, {}),
      "variant": (transformers.ViTModel, VARIANT, {}),
      "classifier": (transformers.ViTForImageClassification, dict(TINY, num_labels=5), {}),
  }
  out = {}
  for i, (name, (cls, config, kwargs)) in enumerate(cases.items()):
    model = _randomise(cls(transformers.ViTConfig(**config), **kwargs), seed=i).eval()
    model.save_pretrained(str(root / name))
    out[name] = (str(root / name), model)
  return out


@functools.lru_cache(maxsize=None)
def _apply(module):
  return jax.jit(module.apply, static_argnames="interpolate_pos_encoding")


@pytest.mark.parametrize("case", ["plain", "pooler", "variant"])
def test_parity(folders, case):
  folder, model = folders[case]
  pixels = _pixels(3, 32, 32)
  with torch.no_grad():
    ref = model(_nchw(pixels), output_hidden_states=True)
  module, params = vit.load(folder)
  assert module.add_pooling_layer == (case != "plain")
  out = _apply(module)({"params": params}, pixels)
  assert out.last_hidden_state.shape == (3, 1 + (32 // 8) ** 2, 32)
  assert rel_err(out.last_hidden_state, t2n(ref.last_hidden_state)) <= TOL
  assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    assert rel_err(ours, t2n(theirs)) <= TOL
  if case == "plain":
    assert out.pooled is None and ref.pooler_output is None
  else:
    assert out.pooled.shape == (3, model.config.pooler_output_size)
    assert rel_err(out.pooled, t2n(ref.pooler_output)) <= TOL


@pytest.mark.parametrize("case,size", [("pooler", (48, 40)), ("variant", (24, 40)),
                                       ("pooler", (41, 30)), ("pooler", (33, 39))])
def test_interpolate_pos_encoding(folders, case, size):
  """Up, down, both at once from sizes not a multiple of the patch (floored, as torch's conv),
  and a non-square image on the config's own 4x4 grid (transformers resamples it 4x4 -> 4x4,
  the identity; we skip it): torch's bicubic, number for number."""
  folder, model = folders[case]
  pixels = _pixels(2, *size, seed=1)
  with torch.no_grad():
    ref = model(_nchw(pixels), interpolate_pos_encoding=True)
  module, params = vit.load(folder)
  out = _apply(module)({"params": params}, pixels, interpolate_pos_encoding=True)
  assert out.last_hidden_state.shape == (2, 1 + (size[0] // 8) * (size[1] // 8), 32)
  assert rel_err(out.last_hidden_state, t2n(ref.last_hidden_state)) <= TOL
  assert rel_err(out.pooled, t2n(ref.pooler_output)) <= TOL
  with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}.*takes 32x32"):
    module.apply({"params": params}, pixels)


@pytest.mark.parametrize("in_size,out_size", [(4, 6), (6, 4), (24, 7), (5, 17), (3, 3), (1, 2)])
def test_bicubic_matrix_is_torchs(in_size, out_size):
  grid = np.random.default_rng(2).normal(size=(1, 3, in_size, in_size + 2)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(out_size, out_size + 1),
                                        mode="bicubic", align_corners=False).numpy()
  ours = np.einsum("ih,chw,jw->cij", vit.torch_bicubic_matrix(in_size, out_size), grid[0],
                   vit.torch_bicubic_matrix(in_size + 2, out_size + 1))
  np.testing.assert_allclose(ours, ref[0], rtol=1e-5, atol=1e-5)


def test_image_classification_folder(folders):
  folder, model = folders["classifier"]
  pixels = _pixels(2, 32, 32, seed=3)
  with torch.no_grad():
    ref = model.vit(_nchw(pixels)).last_hidden_state
  module, params = vit.load(folder)
  assert not module.add_pooling_layer
  out = _apply(module)({"params": params}, pixels)
  assert rel_err(out.last_hidden_state, t2n(ref)) <= TOL
  with pytest.raises(CheckpointError, match=r"no pooler weights \(vit\.pooler\.dense"):
    vit.load(folder, add_pooling_layer=True)


def test_pooler_in_file_not_wanted_and_state_dict_layouts(folders):
  folder, model = folders["pooler"]
  module, params = vit.load(folder)
  bare, bare_params = vit.load(folder, add_pooling_layer=False, remat=True)
  assert not bare.add_pooling_layer and "pooler" not in bare_params
  jax.tree.map(np.testing.assert_array_equal, bare_params,
               {k: v for k, v in params.items() if k != "pooler"})
  # transformers 5's in-memory names (layers.0.attention.q_proj, mlp.fc1, ...), under a prefix
  # beside keys of other towers, as a converter meets them: the same params.
  sd = {"vit." + k: t2n(v) for k, v in model.state_dict().items()}
  assert "vit.layers.0.attention.q_proj.weight" in sd
  sd["text.encoder.weight"] = np.zeros((3, 3), np.float32)
  from_sd = vit.params_from_state_dict(sd, module.config, where="memory", prefix="vit.",
                                       add_pooling_layer=True)
  jax.tree.map(np.testing.assert_array_equal, from_sd, params)


def test_remat_same_values_and_gradients(folders):
  folder, _ = folders["variant"]
  module, params = vit.load(folder)
  pixels = jnp.asarray(_pixels(1, 32, 32, seed=4))

  def grads(m):
    loss = lambda p, x: jnp.sum(m.apply({"params": p}, x).pooled ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, pixels)

  (value, (g_params, g_pixels)), (value_r, (g_params_r, g_pixels_r)) = (
      grads(module), grads(module.clone(remat=True)))
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  assert float(jnp.abs(g_pixels).max()) > 0
  assert rel_err(g_pixels_r, g_pixels) <= 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_params_r,
               g_params)


def _meta_count(config, **kwargs) -> int:
  with torch.device("meta"):
    return sum(p.numel() for p in transformers.ViTModel(config, **kwargs).parameters())


def test_real_size_presets():
  """The presets are the published configs; ViT-L/16-384 builds abstractly with transformers'
  parameter count (a meta-device model allocates nothing; neither does eval_shape)."""
  assert vit.ViTConfig.from_dict(transformers.ViTConfig().to_dict()) == vit.PRESETS[
      "vit-base-patch16-224"]
  hf = transformers.ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, image_size=384, patch_size=16)
  config = vit.ViTConfig.from_dict(hf.to_dict())
  assert config == vit.PRESETS["vit-large-patch16-384"]
  pixels = jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32)
  for pooler in (True, False):
    module = vit.ViTModel(config, add_pooling_layer=pooler)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(pixels.shape)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    assert count == _meta_count(hf, add_pooling_layer=pooler)
  out = jax.eval_shape(module.apply, abstract, pixels)
  assert out.last_hidden_state.shape == (1, 1 + 24 * 24, 1024)


def test_read_preprocessor(tmp_path):
  config = vit.ViTConfig(**TINY)
  assert vit.read_preprocessor(str(tmp_path), config) == ((32, 32), (0.5,) * 3, (0.5,) * 3)
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  processor = transformers.ViTImageProcessor(size={"height": 24, "width": 40}, image_mean=mean,
                                             image_std=std)
  processor.save_pretrained(str(tmp_path))
  size, got_mean, got_std = vit.read_preprocessor(str(tmp_path), config)
  assert size == (24, 40)
  # The processor's own output on a uint8 image already at that size (no resampling).
  image = np.random.default_rng(5).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
  ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = (image / 255.0 - np.asarray(got_mean)) / np.asarray(got_std)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # An older feature-extractor file: one int for the size, no rescaling (0..255 statistics).
  path = tmp_path / vit.PREPROCESSOR_FILE
  path.write_text(json.dumps({"size": 384, "do_rescale": False, "image_mean": 127.5,
                              "image_std": 127.5}))
  size, got_mean, got_std = vit.read_preprocessor(str(tmp_path), config)
  assert size == (384, 384)
  np.testing.assert_allclose(got_mean + got_std, (0.5,) * 6, rtol=1e-12)


@pytest.mark.parametrize("text", ["{not json", '{"size": {"shortest_edge": 224}}',
                                  '{"image_mean": [0.5, 0.5]}'])
def test_read_preprocessor_malformed(tmp_path, text):
  (tmp_path / vit.PREPROCESSOR_FILE).write_text(text)
  with pytest.raises(CheckpointError, match=str(tmp_path / vit.PREPROCESSOR_FILE)):
    vit.read_preprocessor(str(tmp_path), vit.ViTConfig(**TINY))


def _edit_config(src: str, dst: str, **changes) -> str:
  shutil.copytree(src, dst)
  with open(os.path.join(dst, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump({**config, **changes}, f)
  return dst


def test_errors(folders, tmp_path):
  missing = str(tmp_path / "missing")
  with pytest.raises(CheckpointError, match=f"not found: '{missing}'"):
    vit.load(missing)
  with pytest.raises(CheckpointError, match="not found"):
    vit.read_preprocessor(missing, vit.ViTConfig())
  folder, _ = folders["pooler"]
  clip_like = _edit_config(folder, str(tmp_path / "clip"), model_type="clip_vision_model")
  with pytest.raises(CheckpointError, match=f"{clip_like}/config.json has model_type "
                     "'clip_vision_model'; expected 'vit'"):
    vit.load(clip_like)
  bad = _edit_config(folder, str(tmp_path / "bad"), intermediate_size=40)
  with pytest.raises(CheckpointError, match=(
      rf"intermediate\.dense\.(weight|bias)' in {bad} has shape \(37,.*expects \(40,")):
    vit.load(bad)
  bad_act = _edit_config(folder, str(tmp_path / "act"), hidden_act="mish")
  with pytest.raises(CheckpointError, match=f"{bad_act}/config.json.*hidden_act 'mish'"):
    vit.load(bad_act)
