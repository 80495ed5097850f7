"""The train step's pieces compute the gradient of the loss as JAX's autodiff defines it
(train_step.loss), in every gradient mode, with the latent term and sampler noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import violence
from fnf_jax.diffusion import random_models
from fnf_jax.fnf import train_step
from fnf_jax.data import examples
from fnf_jax.rewards import registry

PROMPTS = ["a red circle", "a blue square"]


# The toy UNet cut to one level without a mid block: compiling its forward and backward (twice:
# autodiff and the pieces) dominates these tests, and the pieces do not depend on the UNet's depth
# (its cross-attention down and up blocks still carry the LoRA).
UNET = dict(random_models.TINY_UNET, block_out_channels=(32,), mid_block_type=None,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))


@pytest.fixture(scope="module")
def pipe():
  return random_models.random_pipeline(0, unet=UNET)


def _setup(pipe, **changes):
  c = violence.get_config("runlocal")
  c.sampling.num_steps = 2
  c.objective.beta = 0.5
  for key, value in changes.items():
    section, field = key.split(".")
    c[section][field] = value
  reward = registry.build(c.reward)
  step = train_step.build(pipe, reward, c)
  frozen = {**pipe.params, "reward": reward.params, "objective": step.objective}
  batch = examples.host_batch(pipe, examples.make_examples(PROMPTS, 1, 0), negative_prompt="",
                              num_steps=c.sampling.num_steps, eta=c.sampling.eta)
  batch.pop("index")
  state = step.init_state(jax.random.key(0), frozen["unet"])
  # A non-zero LoRA, so that the fine-tuned model differs from the frozen one.
  lora = jax.tree.map(lambda x: x + 0.05, state.lora)
  return step, frozen, batch, state.replace(lora=lora)


@pytest.mark.parametrize("changes", [
    # DRaFT-K (K = 1 of 2) with the latent term and stochastic DDIM (the sampler's noise)
    {"train.grad_steps": 1, "objective.gamma": 1.0, "sampling.eta": 1.0},
    pytest.param({"train.gradient": "full"}, marks=pytest.mark.slow),  # K = S
    {"train.gradient": "lv", "train.lv_copies": 2, "objective.gamma": 1.0},  # DRaFT-LV
], ids=["truncated", "full", "lv"])
def test_pieces_give_the_gradient_of_the_loss(pipe, changes):
  step, frozen, batch, state = _setup(pipe, **changes)
  rng = jax.random.key(1)
  p = step.pieces

  @jax.jit
  def both(state):
    ref, region = step.reference(frozen, batch)
    (loss, (want, _)), g = jax.value_and_grad(step.loss, has_aux=True)(
        state.lora, frozen, batch, rng, ref, region)
    sampled = p.forward(state.lora, frozen, batch, rng)
    metrics, g_x0 = p.image_grads(frozen, batch, sampled.x0, ref, region)
    grads, latent = p.lora_grads(state.lora, frozen, batch, sampled, g_x0, region)
    new, metrics = p.update(state, frozen["objective"], grads, metrics, latent)
    return loss, g, want, grads, new, metrics

  loss, g, want, grads, new, metrics = both(state)
  assert float(optax.global_norm(g)) > 0
  # float32, summed in another order: the whole gradient agrees to 1e-4 relative (Frobenius;
  # seen: 1.2e-5), each element to 1e-3 of its layer's largest.
  diff = optax.global_norm(jax.tree.map(jnp.subtract, grads, g)) / optax.global_norm(g)
  assert float(diff) < 1e-4, float(diff)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * float(jnp.abs(b).max()))
  # The step's metrics: the loss with the latent term, the gradient's norm, every image term.
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(g), rtol=1e-4)
  for key in ("reward", "constraint", "change_outside") + (
      ("latent_term",) if "latent_term" in want else ()):
    np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5, atol=1e-7)
  assert float(metrics["nonfinite"]) == 0 and int(new.step) == 1


def test_the_sampler_keeps_the_inputs_of_the_gradient_steps():
  from fnf_jax.diffusion import sampling  # pylint: disable=g-import-not-at-top
  from fnf_jax.diffusion import schedulers  # pylint: disable=g-import-not-at-top
  cfg = schedulers.DDIMConfig(beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, steps_offset=1, set_alpha_to_one=False)
  den = lambda x, t: jnp.tanh(x * 0.7 + t / 1000.0)
  x_T = jax.random.normal(jax.random.key(0), (2, 3, 3, 1))
  x0, xs = sampling.trajectory(den, x_T, cfg, num_steps=5, keep=2)
  want, _ = sampling.sample(den, x_T, cfg, num_steps=5)
  np.testing.assert_array_equal(x0, want)
  # The inputs of steps 4 and 5: three steps from x_T, then one more.
  x3, _ = sampling.sample(den, x_T, cfg, num_steps=5, grad_steps=0)
  step = sampling.step_fn(den, cfg, 5, 0.0)
  ts = schedulers.timesteps(cfg, 5)
  x = x_T
  for t in ts[:3]:
    x = step(x, (t, None))[0]
  np.testing.assert_allclose(xs[0], x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(xs[1], step(x, (ts[3], None))[0], rtol=1e-5, atol=1e-6)
  assert x3.shape == x0.shape
