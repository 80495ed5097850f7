"""`color`: a simple, analytic, differentiable reward that tests and wiring runs can reason about.

It penalises pixels close to a target colour (think: "remove the red blotches"):
    heatmap(x) = exp(-|x - c|^2 / (2 sigma^2))          per pixel, in [0, 1]
    score(x)   = -mean over pixels of heatmap(x)
So the mask is where the colour is, and raising the score means changing exactly those pixels.
"""

import jax.numpy as jnp

from fnf_jax.rewards import registry


def _closeness(images, color, sigma):
  d2 = jnp.sum((images - jnp.asarray(color, images.dtype)) ** 2, axis=-1)
  return jnp.exp(-d2 / (2.0 * sigma**2))


def build(cfg) -> registry.Reward:
  color, sigma = tuple(cfg.color), float(cfg.sigma)
  if len(color) != 3:
    raise ValueError(f"reward.color must be an RGB triple in [0, 1], got {cfg.color}")

  def heatmap(params, images, prompt_ids):
    del params, prompt_ids
    return _closeness(images, color, sigma)

  def score(params, images, prompt_ids):
    return -jnp.mean(heatmap(params, images, prompt_ids), axis=(1, 2))

  return registry.Reward(name="color", score=score, heatmap=heatmap, params={})
