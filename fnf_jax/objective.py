"""The Focus-N-Fix objective (and DRaFT as its special case), as pure functions.

    J(θ) = E[ r(Î, c) − β · ‖(1 − M) ⊙ (Î − Î0)‖_F ]   (− γ · latent ε-difference outside m)

We minimise loss = −J. DRaFT is the same code with M ≡ 1 and β = γ = 0.
"""

import jax
import jax.numpy as jnp

from fnf_jax import choices

REWARD_REGIONS = choices.REWARD_REGIONS
CONSTRAINT_NORMS = choices.CONSTRAINT_NORMS


def reward_input(images: jax.Array, mask: jax.Array, region: str) -> jax.Array:
  """What the reward sees. "mask": the same pixels, but gradients flow only inside M.

  M ⊙ Î + (1 − M) ⊙ stop_gradient(Î) has the value Î, so the reward's value is unchanged;
  only its gradient outside the mask is cut.
  """
  if region not in REWARD_REGIONS:
    raise ValueError(f"reward region {region!r} is not one of {REWARD_REGIONS}")
  if region == "full":
    return images
  m = mask[..., None].astype(images.dtype)
  return m * images + (1 - m) * jax.lax.stop_gradient(images)


def _safe_sqrt(x: jax.Array) -> jax.Array:
  # sqrt has an infinite derivative at 0, and at step 0 Î == Î0 exactly; use the subgradient 0.
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def regional_constraint(images: jax.Array, reference: jax.Array, mask: jax.Array,
                        norm: str = "fro") -> jax.Array:
  """Per-example change outside the mask, [B]: ‖(1 − M) ⊙ (Î − Î0)‖ in the chosen form.

  fro: unsquared Frobenius norm over (H, W, 3), as the paper writes it; fro_squared: its square;
  mean_squared: the squared norm divided by the number of values (resolution-independent).
  """
  if norm not in CONSTRAINT_NORMS:
    raise ValueError(f"constraint norm {norm!r} is not one of {CONSTRAINT_NORMS}")
  outside = (1 - mask[..., None]) * (images - reference)
  squared = jnp.sum(jnp.square(outside), axis=(1, 2, 3))
  if norm == "fro":
    return _safe_sqrt(squared)
  if norm == "fro_squared":
    return squared
  return squared / (outside[0].size)


def latent_difference(eps: jax.Array, eps_ref: jax.Array, latent_mask: jax.Array) -> jax.Array:
  """γ-term for one gradient step: mean over values of (1 − m) ⊙ (ε_θ − ε_θ0)², [B]."""
  d = (1 - latent_mask[..., None]) * jnp.square(eps.astype(jnp.float32) - eps_ref.astype(jnp.float32))
  return jnp.mean(d, axis=(1, 2, 3))


def latent_mask(mask: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
  """Image-resolution mask -> latent grid (area average: a latent cell partly inside counts)."""
  return jax.image.resize(mask, mask.shape[:1] + tuple(latent_hw), "linear")


def loss(*, rewards: jax.Array, images: jax.Array, reference: jax.Array, mask: jax.Array,
         cfg, latent_term: jax.Array | None = None,
         region: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Total loss (scalar) and per-step metrics.

  cfg fields: beta (pixel constraint weight), gamma (latent term weight), constraint_norm,
  reward_weight. `region` (default: `mask`) is the mask the change metrics are measured in.
  """
  constraint = regional_constraint(images, reference, mask, cfg.constraint_norm)
  total = -cfg.reward_weight * jnp.mean(rewards) + cfg.beta * jnp.mean(constraint)
  metrics = {"loss": total, "reward": jnp.mean(rewards), "reward_std": jnp.std(rewards),
             "constraint": jnp.mean(constraint),
             **change_metrics(images, reference, mask if region is None else region)}
  if latent_term is not None:
    total, metrics = add_latent_term(total, metrics, latent_term, cfg)
  return total, metrics


def add_latent_term(total: jax.Array, metrics: dict, latent_term: jax.Array,
                    cfg) -> tuple[jax.Array, dict]:
  """The γ-term's share: total + γ · mean(latent term), and its metric. The training step adds
  it apart from the image terms (its gradient comes back through the sampler's steps)."""
  total = total + cfg.gamma * jnp.mean(latent_term)
  return total, dict(metrics, loss=total, latent_term=jnp.mean(latent_term))


def change_metrics(images: jax.Array, reference: jax.Array, mask: jax.Array) -> dict:
  """Mask area and mean absolute change of Î against Î0 inside and outside the mask."""
  m = jax.lax.stop_gradient(mask)[..., None]
  change = jnp.abs(jax.lax.stop_gradient(images - reference))
  inside = jnp.sum(m * change) / jnp.maximum(jnp.sum(m) * 3, 1.0)
  outside = jnp.sum((1 - m) * change) / jnp.maximum(jnp.sum(1 - m) * 3, 1.0)
  return {"mask_area": jnp.mean(mask), "change_inside": inside, "change_outside": outside}
