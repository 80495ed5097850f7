"""The Focus-N-Fix objective: where reward gradients act, the regional constraint, and how the
weights w, β, γ combine the terms."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import focus_n_fix
from fnf_jax.fnf import objective


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


def _objective(**changes):
  fields = dict(mask="heatmap", reward_region="mask", reward_weight=1.0, beta=0.0,
                constraint_norm="fro", gamma=0.0)
  return objective.Objective(**{**fields, **changes})


def test_draft_is_the_same_code_with_ones_mask_and_no_constraint():
  obj = _objective(mask="ones", reward_region="full")
  images, ref = _images(2), _images(3)
  ones = jnp.ones(images.shape[:3])
  rewards = _reward(objective.reward_input(images, ones, "mask"))
  total, metrics = objective.loss(rewards=rewards, images=images, reference=ref, mask=ones, obj=obj)
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


# Two examples of 2 x 2 pixels: M covers the left column. Î differs from Î0 inside and outside.
REFERENCE = np.array([[[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], [[0.7, 0.8, 0.9], [0.2, 0.4, 0.6]]],
                      [[[0.3, 0.1, 0.2], [0.9, 0.8, 0.7]], [[0.5, 0.5, 0.5], [0.0, 0.1, 0.2]]]],
                     np.float32)
CHANGE = np.array([[[[0.5, -0.5, 0.5], [0.1, 0.0, -0.2]], [[0.9, 0.9, 0.9], [0.0, 0.3, 0.0]]],
                   [[[-0.4, 0.0, 0.0], [0.0, -0.1, 0.1]], [[0.0, 0.0, 0.0], [0.2, 0.2, -0.2]]]],
                  np.float32)
MASK = np.array([[[1, 0], [1, 0]], [[1, 0], [1, 0]]], np.float32)
REWARDS = np.array([0.8, -0.3], np.float32)
LATENT = np.array([0.05, 0.25], np.float32)


@pytest.mark.parametrize("norm", objective.CONSTRAINT_NORMS)
def test_loss_weighs_reward_constraint_and_latent_term(norm):
  w, beta, gamma = 0.7, 0.3, 0.2
  obj = _objective(reward_weight=w, beta=beta, gamma=gamma, constraint_norm=norm)
  images = REFERENCE + CHANGE
  # By hand, in float64: the right column's change, per example.
  outside = CHANGE.astype(np.float64)[:, :, 1, :]
  squared = np.array([np.sum(outside[b] ** 2) for b in range(2)])
  per_example = {"fro": np.sqrt(squared), "fro_squared": squared,
                 "mean_squared": squared / (2 * 2 * 3)}[norm]
  r, c, l = REWARDS.astype(np.float64).mean(), per_example.mean(), LATENT.astype(np.float64).mean()
  assert c > 0 and l > 0
  args = dict(rewards=jnp.asarray(REWARDS), images=jnp.asarray(images),
              reference=jnp.asarray(REFERENCE), mask=jnp.asarray(MASK), obj=obj)

  total, metrics = objective.loss(**args)
  np.testing.assert_allclose(total, -w * r + beta * c, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], -w * r + beta * c, rtol=1e-6)
  assert "latent_term" not in metrics

  total, metrics = objective.loss(**args, latent_term=jnp.asarray(LATENT))
  want = -w * r + beta * c + gamma * l
  np.testing.assert_allclose(total, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
  np.testing.assert_allclose(metrics["reward"], r, rtol=1e-6)
  np.testing.assert_allclose(metrics["reward_std"], np.std(REWARDS.astype(np.float64)), rtol=1e-6)
  np.testing.assert_allclose(metrics["constraint"], c, rtol=1e-6)
  np.testing.assert_allclose(metrics["latent_term"], l, rtol=1e-6)
  # The change metrics: mean |Î − Î0| over the masked (left) and unmasked (right) values.
  np.testing.assert_allclose(metrics["mask_area"], 0.5)
  np.testing.assert_allclose(metrics["change_inside"], np.abs(CHANGE[:, :, 0]).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["change_outside"], np.abs(outside).mean(), rtol=1e-5)


def test_from_config_reads_the_objective_block():
  c = focus_n_fix.base_config().objective
  c.mask, c.reward_region, c.constraint_norm = "ones", "full", "mean_squared"
  c.reward_weight, c.beta, c.gamma = 0.7, 0.3, 0.2
  obj = objective.Objective.from_config(c)
  assert obj == objective.Objective(mask="ones", reward_region="full", reward_weight=0.7,
                                    beta=0.3, constraint_norm="mean_squared", gamma=0.2,
                                    latent=True)
  assert obj.computes_latent  # γ > 0
  assert {f.name for f in dataclasses.fields(obj)} == set(c.keys()) | {"latent"}
  with pytest.raises(dataclasses.FrozenInstanceError):
    obj.beta = 0.0  # type: ignore[misc]
  # The weights are the pytree's leaves (runtime inputs of the step), the choices static.
  assert jax.tree.leaves(obj) == [0.7, 0.3, 0.2]


def test_other_weights_run_the_same_program():
  """β, γ and w are arguments of the step's programs: changing them never recompiles, and the
  loss follows them exactly as with the weights folded in as constants."""
  args = dict(rewards=jnp.asarray(REWARDS), images=jnp.asarray(REFERENCE + CHANGE),
              reference=jnp.asarray(REFERENCE), mask=jnp.asarray(MASK))
  traces = []

  @jax.jit
  def total(obj):
    traces.append(1)
    return objective.loss(**args, obj=obj, latent_term=jnp.asarray(LATENT))[0]

  for w, beta, gamma in [(0.7, 0.3, 0.2), (1.0, 0.0, 0.5), (0.2, 2.0, 0.0)]:
    obj = _objective(reward_weight=w, beta=beta, gamma=gamma, constraint_norm="fro_squared")
    constant = objective.loss(**args, obj=obj, latent_term=jnp.asarray(LATENT))[0]
    assert float(total(obj)) == float(constant)
  assert len(traces) == 1


def test_from_config_missing_or_bad_field():
  fields = dict(focus_n_fix.base_config().objective)
  del fields["gamma"]
  with pytest.raises(AttributeError, match="gamma"):
    objective.Objective.from_config(ml_collections.ConfigDict(fields))
  # Values are fnf_jax.config.validate's to check; a bad name fails where it is used.
  obj = objective.Objective.from_config(
      ml_collections.ConfigDict(dict(fields, gamma=0.0, constraint_norm="l1")))
  with pytest.raises(ValueError, match="fro_squared"):
    objective.loss(rewards=jnp.asarray(REWARDS), images=jnp.asarray(REFERENCE),
                   reference=jnp.asarray(REFERENCE), mask=jnp.asarray(MASK), obj=obj)
