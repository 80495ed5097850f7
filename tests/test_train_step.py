"""Code paths of the step that the loop tests do not take: DRaFT-LV, the latent term, accumulation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import violence
from fnf_jax import optimizer
from fnf_jax import random_models
from fnf_jax import train_step
from fnf_jax.data import examples
from fnf_jax.rewards import registry


def test_lv_with_latent_term_gives_finite_lora_gradients():
  c = violence.get_config("runlocal")
  c.sampling.num_steps = 2
  c.train.gradient = "lv"
  c.train.lv_copies = 2
  c.objective.gamma = 1.0
  pipe = random_models.random_pipeline(0)
  reward = registry.build(c.reward)
  step = train_step.build(pipe, reward, c)
  frozen = {**pipe.params, "reward": reward.params}
  chunk = examples.make_examples(["a red circle", "a blue square"], 1, 0)
  batch = examples.host_batch(pipe, chunk, negative_prompt="", num_steps=2, eta=0.0)
  batch.pop("index")
  state = step.init_state(jax.random.key(0), frozen["unet"])
  # Non-zero LoRA so that the fine-tuned model differs from the frozen one.
  lora = jax.tree.map(lambda x: x + 0.05, state.lora)

  @jax.jit
  def grads(lora):
    ref, mask = step.reference(frozen, batch)
    (_, (metrics, images)), g = jax.value_and_grad(step.loss, has_aux=True)(
        lora, frozen, batch, jax.random.key(1), ref, mask)
    return g, metrics, images

  g, metrics, images = grads(lora)
  assert images.shape == (4, 16, 16, 3)  # copies x batch
  assert float(metrics["latent_term"]) > 0
  norm = float(optax.global_norm(g))
  assert np.isfinite(norm) and norm > 0


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
