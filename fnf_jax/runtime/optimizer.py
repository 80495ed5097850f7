"""The optimizer of the LoRA weights and its learning-rate schedule (config block `optim`).

AdamW with linear warm-up (then constant or cosine), global-norm clipping and gradient
accumulation. The rate and Adam's constants are injected hyperparameters: they live in the
optimizer state, not in the compiled program, so runs that differ only in them share one
compilation.
"""

import jax
import jax.numpy as jnp
import optax

from fnf_jax.config import choices


def schedule_shape(cfg):
  """count -> multiplier of the learning rate in [0, 1]: linear warm-up, then constant or cosine."""
  if cfg.schedule not in choices.LR_SCHEDULES:
    raise ValueError(f"optim.schedule {cfg.schedule!r} is not one of {choices.LR_SCHEDULES}")
  warmup = max(cfg.warmup_steps, 1)
  decay = max(cfg.decay_steps - cfg.warmup_steps, 1)

  def shape(count):
    ramp = jnp.minimum(count / warmup, 1.0)
    if cfg.schedule == "constant":
      return ramp
    progress = jnp.clip((count - cfg.warmup_steps) / decay, 0.0, 1.0)
    return jnp.where(count < cfg.warmup_steps, ramp, 0.5 * (1 + jnp.cos(jnp.pi * progress)))

  return shape


def optimizer(cfg) -> optax.GradientTransformation:
  """The transformation of config block `optim` (lr, schedule, warmup_steps, decay_steps, b1, b2,
  weight_decay, grad_clip, grad_accum)."""
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.lr, b1=cfg.b1, b2=cfg.b2,
                                            weight_decay=cfg.weight_decay),
      optax.scale_by_schedule(schedule_shape(cfg)))
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx


def _is_injected(x) -> bool:
  # optax names the state class differently across versions; it always has `hyperparams`.
  return hasattr(x, "hyperparams") and isinstance(x.hyperparams, dict)


# The injected hyperparameters and the optim fields that set them.
HYPERPARAMS = {"learning_rate": "lr", "b1": "b1", "b2": "b2", "weight_decay": "weight_decay"}


def with_hyperparams(cfg, opt_state):
  """`opt_state` with the injected rate and Adam constants set from `cfg`: what a resumed run
  applies (the restored state holds the values of the run that saved it)."""
  def one(x):
    if not _is_injected(x):
      return x
    values = {k: jnp.asarray(cfg[HYPERPARAMS[k]], jnp.asarray(v).dtype) if k in HYPERPARAMS
              else v for k, v in x.hyperparams.items()}
    return x._replace(hyperparams=values)
  return jax.tree.map(one, opt_state, is_leaf=_is_injected)


def learning_rate(cfg, opt_state, update: jax.Array) -> jax.Array:
  """The rate the optimizer applies at optimizer update number `update` (for logging)."""
  injected = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(s)]
  return injected[0].hyperparams["learning_rate"] * schedule_shape(cfg)(update)
