"""The memory settings change memory, not numbers: UNet and VAE remat (chunked attention:
tests/test_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.diffusion import random_models
from fnf_jax.models import convert
from fnf_jax.models import lora as lora_lib
from fnf_jax.models import unet as unet_lib
from fnf_jax.models import vae as vae_lib


def test_unet_and_vae_remat_keep_outputs_and_gradients():
  # Each forward and each gradient is one jitted program. Run eagerly, every op compiled on its
  # own, and inside each remat block every jnp helper compiled again (hundreds of compiles, over
  # twice the CPU time). Jitted without a grad, remat lowers to the plain ops, so the forwards
  # still agree exactly (value_and_grad's would not: remat's barriers change the fusion).
  cfg = unet_lib.UNetConfig.from_dict(random_models.TINY_UNET)
  plain, remat = (unet_lib.UNet2DConditionModel(cfg, remat=r) for r in (False, True))
  params = random_models.init_params(convert.abstract_params(plain, *unet_lib.dummy_inputs(cfg)), 0)
  lora = jax.tree.map(lambda x: x + 0.01, lora_lib.init(jax.random.key(0), params, rank=2))
  x, t, ctx, _ = unet_lib.dummy_inputs(cfg, batch=2, size=8, context_length=5)
  x = jax.random.normal(jax.random.key(1), x.shape)
  ctx = jax.random.normal(jax.random.key(2), ctx.shape)

  def loss(module):
    return lambda lo: jnp.sum(module.apply({"params": params, "lora": lora_lib.collection(lo, 1.0)},
                                           x, t + 500.0, ctx) ** 2)

  np.testing.assert_array_equal(jax.jit(loss(plain))(lora), jax.jit(loss(remat))(lora))
  for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss(plain)))(lora)),
                  jax.tree.leaves(jax.jit(jax.grad(loss(remat)))(lora))):
    # Recomputed activations may fuse differently: equal to rounding, relative to the norm.
    assert np.linalg.norm(np.asarray(a) - b) <= 1e-5 * np.linalg.norm(a)

  vcfg = vae_lib.VAEConfig.from_dict(random_models.TINY_VAE)
  vp, vr = (vae_lib.AutoencoderKL(vcfg, remat=r) for r in (False, True))
  vparams = random_models.init_params(convert.abstract_params(vp, vae_lib.dummy_images(vcfg)), 1)
  z = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
  decode = lambda m: lambda zz: jnp.sum(jnp.tanh(m.apply({"params": vparams}, zz, method=m.decode)))
  np.testing.assert_array_equal(jax.jit(decode(vp))(z), jax.jit(decode(vr))(z))
  g, gr = (np.asarray(jax.jit(jax.grad(decode(m)))(z)) for m in (vp, vr))
  assert np.linalg.norm(g - gr) <= 1e-5 * np.linalg.norm(g)
