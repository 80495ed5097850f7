"""LoRA beside the frozen kernel: its effect survives a bfloat16 model, and in float32 it is the
merged kernel's computation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fnf_jax.diffusion import random_models
from fnf_jax.models import convert
from fnf_jax.models import lora as lora_lib
from fnf_jax.models import unet as unet_lib

CFG = unet_lib.UNetConfig.from_dict(random_models.TINY_UNET)


def _model_and_lora():
  """Tiny UNet params whose LoRA'd kernels have one magnitude mid-binade (so half a bfloat16 step
  is 0.26 % of every entry), and a rank-4 LoRA with |s·A·B| = 1e-3 |W| at each of them."""
  abstract = convert.abstract_params(unet_lib.UNet2DConditionModel(CFG),
                                     *unet_lib.dummy_inputs(CFG))
  init = random_models.init_params(abstract, 0)
  params = traverse_util.flatten_dict(init)
  lora = traverse_util.flatten_dict(lora_lib.init(jax.random.key(1), init, rank=4))
  rng = np.random.default_rng(2)
  for path in [p for p in lora if p[-1] == "lora_b"]:
    kernel = path[:-1] + ("kernel",)
    w = params[kernel]
    params[kernel] = (np.sign(w) * 1.5 * 2.0 ** np.round(np.log2(w.std()))).astype(np.float32)
    b = rng.standard_normal(lora[path].shape).astype(np.float32)
    delta = np.asarray(lora[path[:-1] + ("lora_a",)]) @ b
    lora[path] = jnp.asarray(b * 1e-3 * np.linalg.norm(params[kernel]) / np.linalg.norm(delta))
  return traverse_util.unflatten_dict(params), traverse_util.unflatten_dict(lora)


def test_lora_changes_a_bfloat16_unet_as_much_as_a_float32_one():
  params, lora = _model_and_lora()
  batch = 512  # many outputs: bfloat16's own rounding noise averages out of the projection
  x = jax.random.normal(jax.random.key(3), (batch, 8, 8, 4))
  t = jnp.linspace(10.0, 900.0, batch)
  context = jax.random.normal(jax.random.key(4), (batch, 77, 32))

  def out(dtype, how):
    module = unet_lib.UNet2DConditionModel(CFG, dtype=jnp.dtype(dtype))
    p = jax.tree.map(lambda v: jnp.asarray(v, dtype), params)
    variables = {"none": {"params": p},
                 "beside": {"params": p, "lora": lora_lib.collection(lora, 1.0)},
                 "merged": {"params": lora_lib.merge(p, lora, scale=1.0)}}[how]
    return np.asarray(jax.jit(module.apply)(variables, x, t, context), np.float64)

  base32 = out("float32", "none")
  change32 = out("float32", "beside") - base32
  assert 5e-4 < np.linalg.norm(change32) / np.linalg.norm(base32) < 2e-2  # about 0.7 %
  # float32: beside the kernel is the merged kernel's computation, to rounding.
  merged32 = out("float32", "merged") - base32
  assert np.linalg.norm(merged32 - change32) <= 1e-2 * np.linalg.norm(change32)

  # bfloat16: the change along the float32 change (the rest is bfloat16's rounding noise,
  # several times larger than a 1e-3 update at every output) is that change, within 10 %.
  base16 = out("bfloat16", "none")
  along = lambda d: float(np.vdot(d, change32) / np.vdot(change32, change32))
  beside = along(out("bfloat16", "beside") - base16)
  merged = along(out("bfloat16", "merged") - base16)
  assert abs(beside - 1.0) <= 0.1, beside
  # Merged into the bfloat16 kernels, the update mostly vanishes (most entries round back to W).
  assert merged < 0.5, merged


def test_collection_folds_the_scale_into_b_and_zero_b_changes_nothing():
  abstract = convert.abstract_params(unet_lib.UNet2DConditionModel(CFG),
                                     *unet_lib.dummy_inputs(CFG))
  params = random_models.init_params(abstract, 0)
  lora = lora_lib.init(jax.random.key(0), params, rank=2)
  coll = lora_lib.collection(jax.tree.map(lambda v: v + 1.0, lora), 3.0)
  flat, flat_coll = traverse_util.flatten_dict(lora), traverse_util.flatten_dict(coll)
  for path, value in flat.items():
    factor = 3.0 if path[-1] == "lora_b" else 1.0
    np.testing.assert_allclose(flat_coll[path], factor * (np.asarray(value) + 1.0), rtol=1e-6)
  # B = 0 at init: the model with its LoRA is the base model, bit for bit.
  module = unet_lib.UNet2DConditionModel(CFG)
  inputs = unet_lib.dummy_inputs(CFG, batch=2, size=8, context_length=5)
  apply = jax.jit(module.apply)  # one program each (eagerly, every op compiles on its own)
  base = apply({"params": params}, *inputs[:3])
  with_lora = apply({"params": params, "lora": lora_lib.collection(lora, 2.0)}, *inputs[:3])
  np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))
