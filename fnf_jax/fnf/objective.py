"""The Focus-N-Fix objective (and DRaFT as its special case), as pure functions.

    J(θ) = E[ r(Î, c) − β · ‖(1 − M) ⊙ (Î − Î0)‖_F ]   (− γ · latent ε-difference outside m)

We minimise loss = −J. DRaFT is the same code with M ≡ 1 and β = γ = 0. `Objective` holds the
weights and choices (config block `objective`); the functions take it or what they need of it.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from fnf_jax.config import choices

REWARD_REGIONS = choices.REWARD_REGIONS
CONSTRAINT_NORMS = choices.CONSTRAINT_NORMS


@flax.struct.dataclass
class Objective:
  """The objective's weights and choices (config block `objective`, configs/focus_n_fix.py):

      loss = −w · mean(r) + β · mean(constraint) + γ · mean(latent term)

  mask: "heatmap" (M is the reward's region of Î0) | "ones" (M ≡ 1: DRaFT).
  reward_region: "mask" (the reward's gradient acts only inside M) | "full" (the paper's r(Î));
    see `reward_input`.
  reward_weight: w, the weight of the batch's mean reward.
  beta: β, the weight of the mean change outside M, ‖(1 − M) ⊙ (Î − Î0)‖ (`regional_constraint`).
  constraint_norm: that change's form, one of CONSTRAINT_NORMS.
  gamma: γ, the weight of the mean latent ε-difference outside m (`latent_difference`).
  latent: whether the γ-term is computed at all (None: when γ > 0). A sweep computes it for
    every member when any has γ > 0 (a member with γ = 0 then adds 0 · term).

  A pytree: the three weights are its leaves, so the step takes them as runtime inputs (in
  `frozen["objective"]`; stacked [N] in a sweep) and other weights never recompile it; the
  choices are static.
  """
  mask: str = flax.struct.field(pytree_node=False)
  reward_region: str = flax.struct.field(pytree_node=False)
  reward_weight: Any
  beta: Any
  constraint_norm: str = flax.struct.field(pytree_node=False)
  gamma: Any
  latent: bool | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def from_config(cls, obj_cfg, *, latent: bool | None = None) -> "Objective":
    """From config.objective, validated by fnf_jax.config.validate (a missing field raises
    AttributeError here; values are not checked again)."""
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "latent"]
    # Decided here, from the config's number: in the step γ is a traced input.
    return cls(**{name: getattr(obj_cfg, name) for name in fields},
               latent=obj_cfg.gamma > 0 if latent is None else latent)

  @property
  def computes_latent(self) -> bool:
    return bool(self.gamma > 0) if self.latent is None else self.latent


def weigh(weight, value: jax.Array) -> jax.Array:
  """weight · value in value's dtype: what a Python-float weight gives (weakly typed), for a
  weight that is a float32 array (a sweep's) too."""
  return jnp.asarray(weight, value.dtype) * value


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
         obj: Objective, latent_term: jax.Array | None = None,
         region: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Total loss (scalar) and per-step metrics: −w · mean(rewards) + β · mean(constraint), and
  + γ · mean(latent_term) when given (`Objective`). `region` (default: `mask`) is the mask the
  change metrics are measured in.
  """
  constraint = regional_constraint(images, reference, mask, obj.constraint_norm)
  mean_reward = jnp.mean(rewards)
  total = weigh(-obj.reward_weight, mean_reward) + weigh(obj.beta, jnp.mean(constraint))
  metrics = {"loss": total, "reward": mean_reward, "reward_std": jnp.std(rewards),
             "constraint": jnp.mean(constraint),
             **change_metrics(images, reference, mask if region is None else region)}
  if latent_term is not None:
    total, metrics = add_latent_term(total, metrics, latent_term, obj)
  return total, metrics


def add_latent_term(total: jax.Array, metrics: dict, latent_term: jax.Array,
                    obj: Objective) -> tuple[jax.Array, dict]:
  """The γ-term's share: total + γ · mean(latent term), and its metric. The training step adds
  it apart from the image terms (its gradient comes back through the sampler's steps)."""
  total = total + weigh(obj.gamma, jnp.mean(latent_term))
  return total, dict(metrics, loss=total, latent_term=jnp.mean(latent_term))


def change_metrics(images: jax.Array, reference: jax.Array, mask: jax.Array) -> dict:
  """Mask area and mean absolute change of Î against Î0 inside and outside the mask."""
  m = jax.lax.stop_gradient(mask)[..., None]
  change = jnp.abs(jax.lax.stop_gradient(images - reference))
  inside = jnp.sum(m * change) / jnp.maximum(jnp.sum(m) * 3, 1.0)
  outside = jnp.sum((1 - m) * change) / jnp.maximum(jnp.sum(1 - m) * 3, 1.0)
  return {"mask_area": jnp.mean(mask), "change_inside": inside, "change_outside": outside}
