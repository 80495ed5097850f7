"""Code paths of the step that the loop tests do not take: accumulation (DRaFT-LV and the
latent term: tests/test_step_pieces.py)."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from fnf_jax.runtime import optimizer


def test_gradient_accumulation_averages_micro_steps():
  cfg = ml_collections.ConfigDict(dict(lr=0.1, schedule="constant", warmup_steps=0,
                                       decay_steps=1, b1=0.9, b2=0.999, weight_decay=0.0,
                                       grad_clip=1e9, grad_accum=2))
  tx = optimizer.optimizer(cfg)
  single = optimizer.optimizer(ml_collections.ConfigDict({**cfg.to_dict(), "grad_accum": 1}))
  params = {"w": jnp.ones(3)}
  g1, g2 = {"w": jnp.asarray([1.0, 0.0, 2.0])}, {"w": jnp.asarray([3.0, 2.0, 0.0])}
  state = tx.init(params)
  u1, state = tx.update(g1, state, params)
  np.testing.assert_array_equal(u1["w"], 0.0)  # no update until the second micro-step
  u2, _ = tx.update(g2, state, params)
  mean = {"w": (g1["w"] + g2["w"]) / 2}
  expected, _ = single.update(mean, single.init(params), params)
  np.testing.assert_allclose(u2["w"], expected["w"], rtol=1e-6)
  np.testing.assert_allclose(optimizer.learning_rate(cfg, state, jnp.asarray(5)), 0.1, rtol=1e-6)
