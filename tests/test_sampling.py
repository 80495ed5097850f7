"""DRaFT-K truncation: gradients reach the parameters only through the last K steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax.diffusion import sampling
from fnf_jax.diffusion import schedulers

CFG = schedulers.DDIMConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            steps_offset=1, set_alpha_to_one=False)
S = 5


def model(theta, x, t):
  # A tiny nonlinear "denoiser" whose output depends on the parameters and the timestep.
  return jnp.tanh(x * theta[0] + theta[1] * (t / 1000.0)) * theta[2]


def run(theta_first, theta_last, k, x_T):
  """Hand-truncated sampler: steps before the last K use theta_first, the last K theta_last."""
  x = x_T
  for i, t in enumerate(schedulers.timesteps(CFG, S)):
    theta = theta_last if i >= S - k else theta_first
    x, _ = schedulers.step(CFG, model(theta, x, t), t, x, num_inference_steps=S)
  return jnp.sum(x ** 2)


@pytest.mark.parametrize("k", [1, 2, S])
def test_truncated_gradient_equals_hand_truncated_sampler(k):
  x_T = jax.random.normal(jax.random.key(0), (2, 3, 3, 2))
  theta0 = jnp.asarray([0.7, 0.4, 0.9])

  def loss(theta):
    x0, _ = sampling.sample(lambda x, t: model(theta, x, t), x_T, CFG, num_steps=S, grad_steps=k)
    return jnp.sum(x0 ** 2)

  grad = np.asarray(jax.grad(loss)(theta0))
  # The hand-truncated version: a frozen copy of the parameters drives the first S - K steps,
  # so only the last K steps depend on the differentiated parameters.
  hand = np.asarray(jax.grad(lambda th: run(theta0, th, k, x_T))(theta0))
  np.testing.assert_allclose(grad, hand, rtol=1e-5, atol=1e-7)
  if k < S:
    full = np.asarray(jax.grad(lambda th: run(th, th, S, x_T))(theta0))
    assert np.abs(full - grad).max() > 1e-3  # truncation really cut something


def test_no_gradient_steps_and_values_match_generation():
  x_T = jax.random.normal(jax.random.key(1), (1, 2, 2, 1))
  theta = jnp.asarray([0.5, 0.2, 1.0])
  gen, _ = sampling.sample(lambda x, t: model(theta, x, t), x_T, CFG, num_steps=S)
  k2, _ = sampling.sample(lambda x, t: model(theta, x, t), x_T, CFG, num_steps=S, grad_steps=2)
  np.testing.assert_allclose(gen, k2, rtol=1e-6)
  g = jax.grad(lambda th: jnp.sum(sampling.sample(
      lambda x, t: model(th, x, t), x_T, CFG, num_steps=S)[0]))(theta)
  np.testing.assert_array_equal(g, 0.0)


def test_lv_copies_share_x0_and_differ_by_noise():
  x_T = jax.random.normal(jax.random.key(2), (2, 2, 2, 1))
  theta = jnp.asarray([0.5, 0.2, 1.0])
  den = lambda x, t: model(theta, x, t)
  x, _ = sampling.sample_lv(den, den, x_T, CFG, num_steps=S, copies=3, rng=jax.random.key(3))
  assert x.shape == (6, 2, 2, 1)
  assert np.abs(np.asarray(x[:2] - x[2:4])).max() > 0
  g = jax.grad(lambda th: jnp.sum(sampling.sample_lv(
      lambda x, t: model(th, x, t), lambda x, t: model(th, x, t), x_T, CFG, num_steps=S,
      copies=2, rng=jax.random.key(3))[0] ** 2))(theta)
  assert np.abs(np.asarray(g)).sum() > 0


def test_guidance_batches_conditional_and_unconditional():
  calls = []

  def m(x, t, c):
    calls.append(x.shape[0])
    return x * c

  den = sampling.guided(m, jnp.full((2, 1, 1, 1), 2.0), jnp.full((2, 1, 1, 1), 1.0), 3.0)
  out = den(jnp.ones((2, 1, 1, 1)), 0)
  np.testing.assert_allclose(out, 1.0 + 3.0 * (2.0 - 1.0))
  assert calls == [4]


def test_bad_k_is_rejected():
  with pytest.raises(ValueError, match="grad_steps"):
    sampling.sample(lambda x, t: x, jnp.zeros((1, 1, 1, 1)), CFG, num_steps=3, grad_steps=4)
