"""fnf_jax.models.unet against diffusers' PyTorch UNet2DConditionModel, and its loading errors.

Tiny random models (SD1-, SD2- and SDXL-like) are saved with `save_pretrained` and read back by
`unet.load`; every parameter is perturbed first, so zero-initialised layers count too.
The full-size SD1.5 check is marked slow: `pytest -m slow tests/test_unet.py`.
"""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax.models import convert
from fnf_jax.models import unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=24)
CONFIGS = {
    # SD 1.x: conv proj_in/proj_out, attention_head_dim an int (= heads, diffusers' quirk).
    "sd1": dict(TINY, layers_per_block=1, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x: linear projections, per-block heads (reversed for the up blocks), upcast attention.
    "sd2": dict(TINY, layers_per_block=(1, 2), attention_head_dim=(2, 4),
                use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL: text_time added condition, deeper transformers in the lower block, no attention on top.
    "sdxl": dict(TINY, layers_per_block=1, attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}
# Knobs no Stable Diffusion release turns, on the SD1 shape.
CONFIGS["options"] = dict(
    CONFIGS["sd1"], downsample_padding=0, mid_block_scale_factor=2.0, center_input_sample=True,
    flip_sin_to_cos=False, freq_shift=1, time_embedding_dim=48, time_embedding_act_fn="silu",
    timestep_post_act="silu", conv_in_kernel=1, conv_out_kernel=1)

SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def perturb_(model: "torch.nn.Module", seed: int = 0) -> None:
  """Adds fan-in-scaled Gaussian noise to every parameter (diffusers zero-inits some)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      scale = 0.5 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.1
      p.add_(torch.randn(p.shape, generator=gen) * scale)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (torch model, folder written by save_pretrained), built on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      torch.manual_seed(0)
      model = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
      perturb_(model)
      folder = str(tmp_path_factory.mktemp(name) / "unet")
      model.save_pretrained(folder)
      cache[name] = model, folder
    return cache[name]

  return get


def inputs(name, batch=2, size=(8, 8), length=5, seed=0):
  """Random torch inputs (NCHW) and the same as numpy NHWC for JAX."""
  cfg = CONFIGS[name]
  gen = torch.Generator().manual_seed(seed)
  sample = torch.randn(batch, 4, *size, generator=gen)
  context = torch.randn(batch, length, cfg["cross_attention_dim"], generator=gen)
  timesteps = torch.tensor([10.0, 937.0][:batch]) if name != "sd2" else torch.tensor(321.0)
  added = None
  if cfg.get("addition_embed_type") == "text_time":
    added = {"text_embeds": torch.randn(batch, 16, generator=gen),
             "time_ids": torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0],
                                       [768.0, 1024.0, 16.0, 32.0, 1024.0, 1024.0]][:batch])}
  jax_args = (sample.numpy().transpose(0, 2, 3, 1), timesteps.numpy(), context.numpy(),
              None if added is None else {k: v.numpy() for k, v in added.items()})
  return (sample, timesteps, context, added), jax_args


def compiled(fn, *args):
  """jit-compiled `fn` for `args`, with LLVM optimisation off: compiling dominates these tests."""
  lowered = jax.jit(fn).lower(*args)
  try:
    return lowered.compile(compiler_options={"xla_backend_optimization_level": "0"})
  except Exception:  # pylint: disable=broad-except  # an XLA without the option
    return lowered.compile()


def run_both(model, loaded, name, **kw):
  """(JAX output as float32 NCHW, PyTorch reference) of one random input."""
  (sample, t, ctx, added), jax_args = inputs(name, **kw)
  with torch.no_grad():
    ref = model(sample, t, ctx, added_cond_kwargs=added).sample.numpy()
  module, params = loaded
  out = compiled(module.apply, {"params": params}, *jax_args)({"params": params}, *jax_args)
  return np.asarray(out, np.float32).transpose(0, 3, 1, 2), ref


@pytest.mark.parametrize("name", ["sd1", "options"])
def test_parity(saved, name):
  model, folder = saved(name)
  out, ref = run_both(model, unet.load(folder), name)
  assert out.shape == ref.shape == (2, 4, 8, 8)
  assert rel_err(out, ref) <= 1e-4


def test_parity_sd2_odd_latent_size(saved):
  """Also a latent that is no multiple of 2**(blocks-1): the up blocks then upsample to the
  skip connection's size, as diffusers does; and a scalar timestep."""
  model, folder = saved("sd2")
  out, ref = run_both(model, unet.load(folder), "sd2", batch=1, size=(9, 7))
  assert out.shape == ref.shape == (1, 4, 9, 7)
  assert rel_err(out, ref) <= 1e-4


def test_parity_sdxl_num_attention_heads(saved, tmp_path):
  """SDXL-like; config.json rewritten to name heads in `num_attention_heads`, true head dims in
  `attention_head_dim` (diffusers itself refuses to build from such a config)."""
  model, folder = saved("sdxl")
  # Read as heads, 16 would give 4-dim heads: the parity below tells the two readings apart.
  folder = _edited_copy(folder, tmp_path, num_attention_heads=[2, 4], attention_head_dim=[16, 16])
  with open(os.path.join(folder, "config.json")) as f:
    assert unet.UNetConfig.from_dict(json.load(f)).heads == (2, 4)
  out, ref = run_both(model, unet.load(folder), "sdxl")
  assert rel_err(out, ref) <= 1e-4


def test_bfloat16_close_to_float32(saved):
  model, folder = saved("sd1")
  loaded = unet.load(folder, dtype="bfloat16")
  assert loaded[0].dtype == jnp.bfloat16
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(loaded[1]))
  out, ref = run_both(model, loaded, "sd1")
  assert np.isfinite(out).all()
  assert rel_err(out, ref) <= 5e-2


def test_config_from_real_checkpoints():
  common = dict(_class_name="UNet2DConditionModel", _diffusers_version="0.6.0", in_channels=4,
                out_channels=4, sample_size=64, layers_per_block=2, norm_num_groups=32,
                block_out_channels=[320, 640, 1280, 1280], dropout=0.0,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
  sd15 = unet.UNetConfig.from_dict(dict(common, cross_attention_dim=768, attention_head_dim=8))
  assert sd15.heads == (8, 8, 8, 8) and sd15.transformer_depths(up=True)[1] == (1, 1, 1)
  sd21 = unet.UNetConfig.from_dict(dict(common, cross_attention_dim=1024, upcast_attention=True,
                                        attention_head_dim=[5, 10, 20, 20],
                                        use_linear_projection=True))
  assert sd21.heads == (5, 10, 20, 20)  # 64-dim heads everywhere
  sdxl = unet.UNetConfig.from_dict(dict(
      common, block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
      attention_head_dim=[5, 10, 20], num_attention_heads=None, use_linear_projection=True,
      transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]))
  assert sdxl.heads == (5, 10, 20) and sdxl.mid_transformer_depth == 10
  assert sdxl.transformer_depths(up=True) == ((10,) * 3, (2,) * 3, (1,) * 3)
  _, _, _, added = unet.dummy_inputs(sdxl)
  assert added["text_embeds"].shape == (1, 1280) and added["time_ids"].shape == (1, 6)


def test_missing_folder_names_path(tmp_path):
  path = str(tmp_path / "no_such_unet")
  with pytest.raises(convert.CheckpointError, match="no_such_unet"):
    unet.load(path)


def test_bin_only_checkpoint_says_convert(saved, tmp_path):
  model, _ = saved("sd1")
  folder = str(tmp_path / "unet")
  model.save_pretrained(folder, safe_serialization=False)
  assert not any(f.endswith(".safetensors") for f in os.listdir(folder))
  with pytest.raises(convert.CheckpointError, match=r"(?s)safetensors.*[Cc]onvert"):
    unet.load(folder)


def _edited_copy(folder, tmp_path, **changes):
  dst = str(tmp_path / "unet")
  shutil.copytree(folder, dst)
  with open(os.path.join(dst, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return dst


@pytest.mark.parametrize("changes,named", [
    (dict(down_block_types=["AttnDownBlock2D", "DownBlock2D"]), "AttnDownBlock2D"),
    (dict(up_block_types=["UpBlock2D", "SimpleCrossAttnUpBlock2D"]), "SimpleCrossAttnUpBlock2D"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "UNetMidBlock2DSimpleCrossAttn"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(addition_embed_type="text_image"), "text_image"),
    (dict(only_cross_attention=True), "only_cross_attention"),
    (dict(resnet_time_scale_shift="scale_shift"), "scale_shift"),
])
def test_unsupported_config_names_value_and_supported(saved, tmp_path, changes, named):
  _, folder = saved("sd1")
  with pytest.raises(ValueError, match=named) as err:
    unet.load(_edited_copy(folder, tmp_path, **changes))
  if "block_type" in next(iter(changes)):
    kind = next(iter(changes)).split("_")[0]
    supported = {"down": unet.DOWN_BLOCK_TYPES, "up": unet.UP_BLOCK_TYPES,
                 "mid": unet.MID_BLOCK_TYPES}[kind]
    assert all(str(s) in str(err.value) for s in supported)


def test_shape_mismatch_names_key_and_shapes(saved, tmp_path):
  _, folder = saved("sd1")
  with pytest.raises(convert.CheckpointError) as err:
    unet.load(_edited_copy(folder, tmp_path, cross_attention_dim=16))
  msg = str(err.value)
  assert "attn2.to_k.weight" in msg or "attn2.to_v.weight" in msg
  assert "(32, 24)" in msg and "(32, 16)" in msg


def _slow_selected(config) -> bool:
  expr = config.getoption("markexpr") or ""
  return "slow" in expr and "not slow" not in expr


@pytest.mark.slow
def test_parity_sd15_full_size(request, tmp_path):
  if not _slow_selected(request.config):
    pytest.skip("full-size SD1.5 UNet: run with -m slow")
  start = time.time()
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**SD15).eval()
  perturb_(model)
  folder = str(tmp_path / "unet")
  model.save_pretrained(folder)
  gen = torch.Generator().manual_seed(1)
  sample, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 7, 768, generator=gen)
  t = torch.tensor([601.0])
  with torch.no_grad():
    ref = model(sample, t, context).sample.numpy()
  del model  # keep the peak memory at about three copies of the weights

  module, params = unet.load(folder)
  args = (sample.numpy().transpose(0, 2, 3, 1), t.numpy(), context.numpy())
  out = compiled(module.apply, {"params": params}, *args)({"params": params}, *args)
  out = np.asarray(out).transpose(0, 3, 1, 2)
  print(f"SD1.5 full-size parity: rel err {rel_err(out, ref):.2e}, {time.time() - start:.0f} s")
  assert rel_err(out, ref) <= 1e-4
