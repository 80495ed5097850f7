"""fnf_jax.models.vae against diffusers' PyTorch AutoencoderKL on a tiny random checkpoint."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fnf_jax.models import convert
from fnf_jax.models import vae

TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.5, shift_factor=0.1,
)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
  """Every weight random (diffusers' init leaves norms at 1/0 and biases near 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and "norm" in name:
        p.copy_(1 + 0.1 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise / np.sqrt(p[0].numel()))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(folder of a saved random tiny VAE, inputs, diffusers' outputs)."""
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = AutoencoderKL(**TINY).eval()
  _randomise(model)
  folder = str(tmp_path_factory.mktemp("tiny") / "vae")
  model.save_pretrained(folder)
  rng = np.random.RandomState(0)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  latents = rng.randn(2, 16, 16, 4).astype(np.float32)
  nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  nhwc = lambda x: x.permute(0, 2, 3, 1).numpy()
  with torch.no_grad():
    dist = model.encode(nchw(images)).latent_dist
    decoded = model.decode(nchw(latents)).sample
  ref = dict(mean=nhwc(dist.mean), logvar=nhwc(dist.logvar), decoded=nhwc(decoded))
  return dict(folder=folder, model=model, images=images, latents=latents, ref=ref)


def _run(module, params, images, latents):
  @jax.jit
  def f(params, images, latents):
    mean, logvar = module.apply({"params": params}, images, method="encode")
    return mean, logvar, module.apply({"params": params}, latents, method="decode")
  return f(params, images, latents)


def test_parity_float32(tiny):
  module, params = vae.load(tiny["folder"])
  assert module.config.block_out_channels == (32, 64) and module.config.downsample_factor == 2
  mean, logvar, decoded = _run(module, params, tiny["images"], tiny["latents"])
  ref = tiny["ref"]
  assert mean.shape == (2, 16, 16, 4) and decoded.shape == (2, 32, 32, 3)
  assert mean.dtype == logvar.dtype == decoded.dtype == jnp.float32
  assert _rel(mean, ref["mean"]) <= 1e-4
  assert _rel(logvar, ref["logvar"]) <= 1e-4
  assert _rel(decoded, ref["decoded"]) <= 1e-4


def test_bfloat16_is_finite_and_close(tiny):
  module, params = vae.load(tiny["folder"], dtype="bfloat16")
  assert module.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  mean, logvar, decoded = _run(module, params, tiny["images"], tiny["latents"])
  ref = tiny["ref"]
  for got, want in ((mean, ref["mean"]), (logvar, ref["logvar"]), (decoded, ref["decoded"])):
    assert np.isfinite(np.asarray(got)).all()
    assert _rel(got, want) <= 5e-2


def test_legacy_attention_names_and_conv_shapes(tiny):
  """Old checkpoints: query/key/value/proj_attn, some as 1x1 convs [C, C, 1, 1]."""
  module = vae.AutoencoderKL(vae.VAEConfig.from_dict(TINY))
  sd = {k: v.numpy() for k, v in tiny["model"].state_dict().items()}
  expected = vae.params_from_state_dict(module, sd, where="current")
  names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  for as_conv in (False, True):
    old = {}
    for key, value in sd.items():
      for new_name, old_name in names.items():
        if f".attentions.0.{new_name}." in key:
          key = key.replace(f".{new_name}.", f".{old_name}.")
          if as_conv and value.ndim == 2:
            value = value[:, :, None, None]
      old[key] = value
    assert any(".proj_attn.weight" in k for k in old)
    got = vae.params_from_state_dict(module, old, where="legacy")
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_latent_scaling_round_trip():
  cfg = vae.VAEConfig.from_dict(TINY)
  x = jnp.arange(8.0).reshape(1, 2, 1, 4)
  np.testing.assert_allclose(vae.to_latents(x, cfg), (x - 0.1) * 0.5)
  np.testing.assert_allclose(vae.from_latents(vae.to_latents(x, cfg), cfg), x, rtol=1e-6)
  sd = vae.VAEConfig(block_out_channels=(32,), norm_num_groups=32)
  assert sd.shift_factor is None
  np.testing.assert_allclose(vae.to_latents(x, sd), x * 0.18215)


@pytest.mark.parametrize("blocks", [(32,), (32, 32, 64)])
def test_any_number_of_blocks(blocks):
  n = len(blocks)
  cfg = vae.VAEConfig(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * n,
                      up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=2)
  module = vae.AutoencoderKL(cfg)
  images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  f = cfg.downsample_factor
  assert f == 2 ** (len(blocks) - 1)

  def run(images):
    params = module.init(jax.random.key(0), images)["params"]
    mean, logvar = module.apply({"params": params}, images, method="encode")
    return mean, logvar, module.apply({"params": params}, mean, method="decode"), params

  mean, logvar, decoded, params = jax.eval_shape(run, images)
  assert mean.shape == logvar.shape == (1, 16 // f, 16 // f, 4)
  assert decoded.shape == (1, 16, 16, 3)
  assert "resnets_2" in params["decoder"]["up_blocks_0"]  # layers_per_block + 1 in the decoder


def test_remat_keeps_parameter_tree():
  cfg = vae.VAEConfig.from_dict(TINY)
  x = jnp.zeros((1, 4, 4, 3))
  plain = convert.abstract_params(vae.AutoencoderKL(cfg), x)
  remat = convert.abstract_params(vae.AutoencoderKL(cfg, remat=True), x)
  assert jax.tree.structure(plain) == jax.tree.structure(remat)


def test_missing_folder_names_path(tmp_path):
  missing = str(tmp_path / "no_such_vae")
  with pytest.raises(convert.CheckpointError, match="no_such_vae"):
    vae.load(missing)


def test_bin_only_folder_asks_for_safetensors(tiny, tmp_path):
  folder = str(tmp_path / "vae_bin")
  tiny["model"].save_pretrained(folder, safe_serialization=False)
  assert not any(f.endswith(".safetensors") for f in os.listdir(folder))
  with pytest.raises(convert.CheckpointError, match="safetensors"):
    vae.load(folder)


def test_shape_mismatch_names_key_and_shapes(tiny, tmp_path):
  folder = tmp_path / "vae_bad"
  shutil.copytree(tiny["folder"], folder)
  path = str(folder / "diffusion_pytorch_model.safetensors")
  sd = load_file(path)
  sd["decoder.conv_in.weight"] = np.zeros((64, 8, 3, 3), np.float32)
  save_file(sd, path)
  with pytest.raises(convert.CheckpointError,
                     match=r"decoder\.conv_in\.weight.*\(64, 8, 3, 3\).*\(64, 4, 3, 3\)"):
    vae.load(str(folder))


def test_unsupported_config_values_are_named():
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D.*DownEncoderBlock2D"):
    vae.VAEConfig.from_dict(
        dict(TINY, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]))
  with pytest.raises(ValueError, match="AttnUpDecoderBlock2D.*UpDecoderBlock2D"):
    vae.VAEConfig.from_dict(dict(TINY, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]))
  with pytest.raises(ValueError, match="act_fn 'gelu'.*silu"):
    vae.VAEConfig.from_dict(dict(TINY, act_fn="gelu"))
  with pytest.raises(ValueError, match="latents_mean"):
    vae.VAEConfig.from_dict(dict(TINY, latents_mean=[0.0] * 4))
  with pytest.raises(ValueError, match="AutoencoderTiny"):
    vae.VAEConfig.from_dict(dict(TINY, _class_name="AutoencoderTiny"))


def test_config_from_real_sd_json_fields(tiny):
  with open(os.path.join(tiny["folder"], "config.json")) as f:
    d = json.load(f)
  cfg = vae.VAEConfig.from_dict(d)
  assert cfg.block_out_channels == (32, 64) and cfg.scaling_factor == 0.5
  assert cfg.shift_factor == 0.1 and cfg.force_upcast and cfg.use_quant_conv
  hash(cfg)  # a frozen, hashable linen field
