"""The Focus-N-Fix training step: its loss, defined by autodiff end to end, and the step that
computes its gradient in pieces (fnf_jax/fnf/step_pieces.py). Built once per run by
`build(pipe, reward, config)`; the loop compiles the pieces with explicit shardings.

    step = build(pipe, reward, config)
    step.train_step(state, frozen, batch, rng) -> (state, metrics)
    step.loss(lora, frozen, batch, rng, Î0, M) -> (loss, (metrics, Î))
    step.reference(frozen, batch) -> (Î0, M)        step.eval_images(lora, frozen, batch) -> Î

state   TrainState: LoRA params, optimizer state, step (all that changes).
frozen  {"unet", "vae", "text_encoder"[, "text_encoder_2"], "reward", "objective"}: arguments,
        never closed over, so XLA does not constant-fold gigabytes of weights into the
        executable; "objective" is `step.objective` (the weights, runtime inputs too).
batch   {"ids", "neg_ids": [E, B, 77] int32, "x_T": [B, h, w, C], ["noise": [S, B, h, w, C]],
         ["reference": [B, H, W, 3], "mask": [B, H, W]] (cached reference mode),
         ["reward_ids": [B, L] int32] (a reward with its own tokenizer: registry.Reward)}.

Per example: Î0 and M come from the frozen model with the same x_T and sampler noise (cached, or
computed here without gradient); Î is sampled with the LoRA model, gradient through the last K
steps (or DRaFT-LV copies) and the VAE decoder; the objective is in `fnf_jax.fnf.objective`, its
parts on a batch in `fnf_jax.fnf.method`.
"""

import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from fnf_jax.fnf import method
from fnf_jax.config import sweep as config_sweep
from fnf_jax.fnf import objective
from fnf_jax.runtime import optimizer as optimizer_lib
from fnf_jax.diffusion import sampling
from fnf_jax.fnf import step_pieces
from fnf_jax.fnf import sweep
from fnf_jax.models import lora as lora_lib
from fnf_jax.rewards import registry

Sampler = method.Sampler


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  lora: Any
  opt_state: Any


# --- the loss: its definition, by autodiff end to end ------------------------------------------
def generate(pipe, s: Sampler, latent: bool, lora_scale: float, lora, frozen, batch, rng, mask):
  """x_0 with gradients w.r.t. the LoRA params, and the latent-term aux (None without it)."""
  added = lora_lib.collection(lora, lora_scale)
  cond = method.conditioning(pipe, s, frozen, batch)  # encoded once, shared by every denoiser
  # The no-gradient steps see the LoRA as constants: nothing of theirs is kept for the backward.
  prefix = method.denoiser(pipe, s, frozen["unet"], cond, lora=jax.lax.stop_gradient(added))
  copies = s.copies
  aux_fn = method.latent_term_fn(pipe, s, latent, frozen, batch, cond, mask)
  if s.gradient == "lv":
    x0, aux = sampling.sample_lv(prefix,
                                 method.denoiser(pipe, s, frozen["unet"], cond, copies, added),
                                 batch["x_T"], pipe.scheduler, num_steps=s.num_steps,
                                 copies=copies, rng=rng, eta=s.eta, noise=batch.get("noise"),
                                 remat_policy=s.remat_policy, aux_fn=aux_fn)
  else:
    x0, aux = method.sample(pipe, s, method.denoiser(pipe, s, frozen["unet"], cond, lora=added),
                            batch, grad_steps=s.k, aux_fn=aux_fn, prefix_denoise=prefix)
  return x0, aux


def loss(pipe, reward: registry.Reward, s: Sampler, lora_scale: float, lora, frozen, batch, rng,
         reference_images, region):
  """The loss of the LoRA `lora` on a batch: (loss, (metrics, Î)). `region` is M of Î0.

  This is the definition: differentiated by JAX end to end (through the sampler's last K steps,
  rematerialised). The training step computes its gradient in pieces instead (step_pieces)."""
  obj = frozen["objective"]
  mask = method.objective_mask(obj, region)
  x0, aux = generate(pipe, s, obj.computes_latent, lora_scale, lora, frozen, batch, rng, mask)
  return method.image_loss(pipe, reward, s, obj, frozen, batch, x0, reference_images, region,
                           latent_term=aux)


# --- state --------------------------------------------------------------------------------------
def init_state(tx: optax.GradientTransformation, lora_cfg, rng, unet_params,
               start=None) -> TrainState:
  """Step 0: the LoRA `start` (a tree: `Step.start`, from lora.init) or a fresh one from `rng`
  (B = 0: the base model)."""
  if start is None:
    lora = lora_lib.init(rng, unet_params, rank=lora_cfg.rank, pattern=lora_cfg.targets)
  else:
    lora = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), start)
  return TrainState(step=jnp.zeros((), jnp.int32), lora=lora, opt_state=tx.init(lora))


def cached_reference(frozen, batch):
  del frozen
  return batch["reference"], batch["mask"]


class Step(NamedTuple):
  """The run's pure functions, bound to its pipeline, reward and config by `build`."""
  init_state: Callable  # (rng, unet_params[, start]) -> TrainState
  reference: Callable  # (frozen, batch) -> (Î0, M), computed by the frozen model
  loss: Callable  # (lora, frozen, batch, rng, Î0, M) -> (loss, (metrics, Î))
  pieces: step_pieces.Pieces  # the train step's programs (the loop compiles each)
  train_step: Callable  # (state, frozen, batch, rng) -> (state, metrics): the pieces in order
  eval_images: Callable  # (lora, frozen, batch) -> Î
  tx: optax.GradientTransformation
  objective: objective.Objective  # frozen["objective"]: the weights, stacked [N] in a sweep
  start: Any = None  # lora.init's tree (host numpy), for init_state; None: a fresh LoRA
  members: tuple = ()  # a sweep's member labels (fnf_jax/fnf/sweep.py); () for a single run


def build(pipe, reward: registry.Reward, config, start: dict | None = None) -> Step:
  """The step of `config` (validated by fnf_jax.config.validate) for this pipeline and reward.
  `start`: the LoRA tree training starts from (lora.init, read and checked by
  `lora_io.start`); None: a fresh LoRA. With config.sweep, every function takes and returns
  the members stacked on a leading axis (fnf_jax/fnf/sweep.py)."""
  s = Sampler.from_config(config, pipe)
  tx = optimizer_lib.optimizer(config.optim)
  lora_scale = lora_lib.scale(config.lora.rank, config.lora.alpha)
  reference_fn = functools.partial(method.reference, pipe, reward, s, config.mask)
  p = functools.partial
  pieces = step_pieces.Pieces(
      reference=cached_reference if config.train.reference == "cache" else reference_fn,
      forward=p(step_pieces.forward, pipe, s, lora_scale),
      image_grads=p(step_pieces.image_grads, pipe, reward, s),
      lora_grads=p(step_pieces.lora_grads, pipe, s, lora_scale),
      update=p(step_pieces.update, tx, config.optim))
  init = p(init_state, tx, config.lora)
  loss_fn = p(loss, pipe, reward, s, lora_scale)
  eval_fn = p(method.eval_images, pipe, s, lora_scale)
  members = config_sweep.labels(config)
  if members:
    n = len(members)
    obj = sweep.objective(config)
    pieces = sweep.vmapped(pieces)
    init = lambda *args, single=init: sweep.stack(single(*args), n)
    loss_fn, eval_fn = sweep.loss(loss_fn), sweep.eval_images(eval_fn)
  else:
    obj = objective.Objective.from_config(config.objective)
  return Step(
      init_state=init,
      reference=reference_fn,
      loss=loss_fn,
      pieces=pieces,
      train_step=p(step_pieces.run, pieces),
      eval_images=eval_fn,
      tx=tx,
      objective=obj,
      # Only read when set: a pipeline built from abstract params (benchmarks) has no weights.
      start=start,
      members=members)
