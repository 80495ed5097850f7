"""A sweep: several objective settings trained side by side in one compiled step.

config.sweep names values of objective.beta, objective.gamma and objective.reward_weight; each
setting (their product, or a zip) is a member with a LoRA of its own. The members share
everything else: the frozen UNet, VAE, text encoder and reward (one copy in memory), the cached
Î0 and M, the examples, x_T and the step keys, so a member follows the same path as a separate
run of its setting (up to the order of float reductions). The LoRAs, their optimizer states and
the weights are stacked on a leading axis [N] and the step's pieces are vmapped over it; the
prompts' conditioning and the reference do not depend on the LoRA and are computed once. The
stacked axis may be sharded over a mesh axis named "sweep" (config.mesh), so a slice gives each
member devices of its own or packs several on one.

Each member's LoRA is exported to WORKDIR/sweep/<label>.safetensors, <label> its values
("beta=0.1_gamma=0"), loadable as a single run's lora.safetensors is.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.config import sweep as config_sweep
from fnf_jax.fnf import objective as objective_lib
from fnf_jax.fnf import step_pieces

FOLDER = "sweep"


def export_path(workdir: str, name: str) -> str:
  """Where a member's LoRA is exported: WORKDIR/sweep/<label>.safetensors."""
  return os.path.join(workdir, FOLDER, f"{name}.safetensors")


def objective(config) -> objective_lib.Objective:
  """The members' objectives stacked: each weight a float32 [N] array (the config's value where
  it is not swept); the γ-term is computed for all when any member has γ > 0."""
  rows = config_sweep.settings(config)
  weights = {f: np.asarray([s.get(f, config.objective[f]) for s in rows], np.float32)
             for f in config_sweep.FIELDS}
  base = objective_lib.Objective.from_config(config.objective,
                                             latent=bool(np.any(weights["gamma"] > 0)))
  return base.replace(**weights)


def stack(tree, n: int):
  """`tree` repeated on a new leading axis of size n (every member starts from the same state,
  as each separate run would)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def member(tree, i: int):
  """Member i's slice of a stacked tree (its LoRA, as a single run's)."""
  return jax.tree.map(lambda x: x[i], tree)


def _frozen_axes(frozen) -> dict:
  # Only the objective's weights differ per member; the models are shared (not batched).
  return {k: (0 if k == "objective" else None) for k in frozen}


def vmapped(pieces: step_pieces.Pieces) -> step_pieces.Pieces:
  """The step's pieces over stacked members: LoRA, optimizer state, weights and every
  per-member intermediate on axis 0; frozen models, batch, key and reference shared."""
  v = jax.vmap

  def forward(lora, frozen, batch, rng):
    return v(pieces.forward, in_axes=(0, None, None, None))(lora, frozen, batch, rng)

  def image_grads(frozen, batch, x0, reference_images, region):
    return v(pieces.image_grads, in_axes=(_frozen_axes(frozen), None, 0, None, None))(
        frozen, batch, x0, reference_images, region)

  def lora_grads(lora, frozen, batch, sampled, g_x0, region):
    return v(pieces.lora_grads, in_axes=(0, _frozen_axes(frozen), None, 0, 0, None))(
        lora, frozen, batch, sampled, g_x0, region)

  return step_pieces.Pieces(reference=pieces.reference, forward=forward,
                            image_grads=image_grads, lora_grads=lora_grads,
                            update=v(pieces.update))


def loss(single_loss):
  """The loss of every member: (lora [N...], frozen, batch, rng, Î0, M) -> ([N], ...)."""
  def fn(lora, frozen, batch, rng, reference_images, region):
    return jax.vmap(single_loss, in_axes=(0, _frozen_axes(frozen), None, None, None, None))(
        lora, frozen, batch, rng, reference_images, region)
  return fn


def eval_images(single):
  """Î of every member: (lora [N...], frozen, batch) -> [N, B, H, W, 3]."""
  return jax.vmap(single, in_axes=(0, None, None))
