"""The Focus-N-Fix objective: where reward gradients act, and the regional constraint."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fnf_jax import objective


def _images(seed=0, shape=(2, 8, 8, 3)):
  return jax.random.uniform(jax.random.key(seed), shape)


def _mask():
  m = np.zeros((2, 8, 8), np.float32)
  m[:, 2:5, 3:7] = 1.0
  return jnp.asarray(m)


def _reward(images):  # any differentiable, non-local reward
  return jnp.sum(jnp.sin(3 * images) * jnp.arange(1, 4), axis=(1, 2, 3))


def test_mask_region_zeroes_reward_gradient_outside_mask():
  images, mask = _images(), _mask()
  grad_mask = jax.grad(lambda x: _reward(objective.reward_input(x, mask, "mask")).sum())(images)
  grad_full = jax.grad(lambda x: _reward(objective.reward_input(x, mask, "full")).sum())(images)
  outside = (1 - mask)[..., None]
  assert np.all(np.asarray(grad_mask * outside) == 0.0)
  assert np.abs(np.asarray(grad_full * outside)).sum() > 1.0
  # Inside the mask both agree, and the reward's value is unchanged by the masking.
  np.testing.assert_allclose(grad_mask * mask[..., None], grad_full * mask[..., None])
  np.testing.assert_allclose(_reward(objective.reward_input(images, mask, "mask")), _reward(images))


@pytest.mark.parametrize("norm", objective.CONSTRAINT_NORMS)
def test_constraint_ignores_inside_and_is_zero_at_reference(norm):
  ref, mask = _images(1), _mask()
  changed_inside = ref + 0.5 * mask[..., None]
  np.testing.assert_array_equal(objective.regional_constraint(changed_inside, ref, mask, norm), 0.0)
  changed_outside = ref + 0.5 * (1 - mask[..., None])
  value = objective.regional_constraint(changed_outside, ref, mask, norm)
  n_out = float((1 - mask[0]).sum()) * 3
  expected = {"fro": np.sqrt(0.25 * n_out), "fro_squared": 0.25 * n_out, "mean_squared": 0.25 * n_out / (8 * 8 * 3)}[norm]
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # The gradient at Î == Î0 is finite (the unsquared norm's subgradient is taken as 0).
  g = jax.grad(lambda x: objective.regional_constraint(x, ref, mask, norm).sum())(ref)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0.0)


def test_draft_is_the_same_code_with_ones_mask_and_no_constraint():
  cfg = ml_collections.ConfigDict(dict(beta=0.0, gamma=0.0, constraint_norm="fro", reward_weight=1.0))
  images, ref = _images(2), _images(3)
  ones = jnp.ones(images.shape[:3])
  rewards = _reward(objective.reward_input(images, ones, "mask"))
  total, metrics = objective.loss(rewards=rewards, images=images, reference=ref, mask=ones, cfg=cfg)
  np.testing.assert_allclose(total, -jnp.mean(_reward(images)), rtol=1e-6)
  assert metrics["mask_area"] == 1.0


def test_latent_difference_only_counts_outside():
  eps, eps0 = _images(4, (2, 4, 4, 4)), _images(5, (2, 4, 4, 4))
  m = jnp.ones((2, 4, 4))
  np.testing.assert_array_equal(objective.latent_difference(eps, eps0, m), 0.0)
  assert float(objective.latent_difference(eps, eps0, jnp.zeros((2, 4, 4))).min()) > 0


def test_bad_names_list_valid_values():
  with pytest.raises(ValueError, match="full"):
    objective.reward_input(_images(), _mask(), "everywhere")
  with pytest.raises(ValueError, match="fro_squared"):
    objective.regional_constraint(_images(), _images(), _mask(), "l1")
