"""The Focus-N-Fix training step: pure functions, built once per run by `build(pipe, reward,
config)` and jitted by the loop with explicit shardings.

    step = build(pipe, reward, config)
    step.train_step(state, frozen, batch, rng) -> (state, metrics)
    step.reference(frozen, batch) -> (Î0, M)        step.eval_images(lora, frozen, batch) -> Î

state   TrainState: LoRA params, optimizer state, step (all that changes).
frozen  {"unet", "vae", "text_encoder"[, "text_encoder_2"], "reward"}: arguments, never
        closed over, so XLA does not constant-fold gigabytes of weights into the executable.
batch   {"ids", "neg_ids": [E, B, 77] int32, "x_T": [B, h, w, C], ["noise": [S, B, h, w, C]],
         ["reference": [B, H, W, 3], "mask": [B, H, W]] (cached reference mode),
         ["reward_ids": [B, L] int32] (a reward with its own tokenizer: registry.Reward)}.

Per example: Î0 and M come from the frozen model with the same x_T and sampler noise (cached, or
computed here without gradient); Î is sampled with the LoRA model, gradient through the last K
steps (or DRaFT-LV copies) and the VAE decoder; the objective is in `fnf_jax.objective`. The
functions take what they read of the config as arguments (`Sampler`, the `objective` and `mask`
blocks); `build` binds them.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fnf_jax import objective
from fnf_jax import optimizer as optimizer_lib
from fnf_jax import sampling
from fnf_jax import validate
from fnf_jax.models import lora as lora_lib
from fnf_jax.models import lora_io
from fnf_jax.rewards import masks
from fnf_jax.rewards import registry


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  lora: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How Î0 and Î are sampled (config blocks `sampling` and `train`)."""
  num_steps: int
  eta: float
  guidance_scale: float
  gradient: str  # truncated | lv | full
  grad_steps: int  # K of "truncated"
  lv_copies: int
  remat_policy: str
  zero_uncond: bool  # SDXL's zeroed unconditional branch for an empty negative prompt

  @classmethod
  def from_config(cls, config, pipe) -> "Sampler":
    s, t = config.sampling, config.train
    return cls(num_steps=s.num_steps, eta=s.eta, guidance_scale=s.guidance_scale,
               gradient=t.gradient, grad_steps=t.grad_steps, lv_copies=t.lv_copies,
               remat_policy=t.remat_policy,
               zero_uncond=pipe.zeroes_uncond([s.negative_prompt]))

  @property
  def k(self) -> int:
    """The final sampling steps that carry gradient (DRaFT-LV re-noises instead: 0 here)."""
    return {"truncated": self.grad_steps, "full": self.num_steps}.get(self.gradient, 0)

  @property
  def copies(self) -> int:
    """Re-noised copies per example (DRaFT-LV), 1 otherwise."""
    return self.lv_copies if self.gradient == "lv" else 1


# --- sampling ---------------------------------------------------------------------------------
def conditioning(pipe, s: Sampler, frozen, batch):
  """(cond, uncond) as `Pipeline.generate` builds them (so Î0 is the image generate makes)."""
  return pipe.conditioning(frozen, batch["ids"], batch["neg_ids"], guided=s.guidance_scale > 1,
                           zero_uncond=s.zero_uncond)


def denoiser(pipe, s: Sampler, unet_params, cond_uncond, copies: int = 1, lora=None):
  """The guided UNet; `lora` a "lora" collection applied beside the frozen kernels, or None."""
  cond, uncond = cond_uncond
  if copies > 1:  # the same prompts for each re-noised copy (copy-major batch)
    tile = lambda c: jax.tree.map(lambda x: jnp.concatenate([x] * copies, axis=0), c)
    cond, uncond = tile(cond), tile(uncond)
  return pipe.denoiser(unet_params, cond, uncond, s.guidance_scale, lora=lora)


def sample(pipe, s: Sampler, denoise, batch, *, grad_steps: int, aux_fn=None,
           prefix_denoise=None):
  """(x_0 latents, aux mean) of DDIM from the batch's x_T and sampler noise."""
  return sampling.sample(denoise, batch["x_T"], pipe.scheduler, num_steps=s.num_steps,
                         eta=s.eta, noise=batch.get("noise"), grad_steps=grad_steps,
                         remat_policy=s.remat_policy, aux_fn=aux_fn,
                         prefix_denoise=prefix_denoise)


def reference(pipe, reward: registry.Reward, s: Sampler, mask_cfg, frozen,
              batch) -> tuple[jax.Array, jax.Array]:
  """(Î0 [B, H, W, 3], M [B, H, W]) from the frozen model, without gradient."""
  denoise = denoiser(pipe, s, frozen["unet"], conditioning(pipe, s, frozen, batch))
  # The same scan structure as the fine-tuned sample (prefix + K rematerialised steps), so that
  # with a zero LoRA the two are the same computation and Î == Î0 holds bit for bit.
  x0, _ = sample(pipe, s, denoise, batch, grad_steps=s.k)
  images = pipe.decode(frozen["vae"], x0)
  # The reward's region even when the objective ignores it (objective.mask = "ones", DRaFT):
  # the change inside / outside it is what compares the two methods.
  mask = reward_mask(reward, mask_cfg, frozen["reward"], images, reward_ids(reward, batch))
  return jax.lax.stop_gradient(images), jax.lax.stop_gradient(mask)


def reward_ids(reward: registry.Reward, batch, copies: int = 1) -> jax.Array:
  """The prompt ids `reward` reads, tiled `copies` times along the batch: its own tokenizer's
  ("reward_ids" [B, L]) or the pipeline's ("ids" [E, B, T])."""
  if reward.tokenize is not None:
    return jnp.concatenate([batch["reward_ids"]] * copies, 0)
  return jnp.concatenate([batch["ids"]] * copies, 1)


def reward_mask(reward: registry.Reward, mask_cfg, params, images, ids) -> jax.Array:
  """M [B, H, W] of images by the reward: its heatmap through the config's mask chain and gate
  (empty where the reward finds no problem)."""
  heat = reward.heatmap(params, images, ids)
  scores = reward.score(params, images, ids) if mask_cfg.gate == "score" else None
  return masks.from_config(heat, images.shape[1:3], mask_cfg, scores)


def generate(pipe, s: Sampler, gamma: float, lora_scale: float, lora, frozen, batch, rng, mask):
  """Î with gradients w.r.t. the LoRA params, and the latent-term aux (None when gamma = 0)."""
  added = lora_lib.collection(lora, lora_scale)
  cond = conditioning(pipe, s, frozen, batch)  # encoded once, shared by every denoiser
  # The no-gradient steps see the LoRA as constants: nothing of theirs is kept for the backward.
  prefix = denoiser(pipe, s, frozen["unet"], cond, lora=jax.lax.stop_gradient(added))
  copies = s.copies
  aux_fn = None
  if gamma > 0:
    base = denoiser(pipe, s, frozen["unet"], cond, copies)
    m = jnp.concatenate([objective.latent_mask(mask, batch["x_T"].shape[1:3])] * copies, 0)
    aux_fn = lambda x, tt, out: objective.latent_difference(
        out, jax.lax.stop_gradient(base(x, tt)), m)
  if s.gradient == "lv":
    x0, aux = sampling.sample_lv(prefix, denoiser(pipe, s, frozen["unet"], cond, copies, added),
                                 batch["x_T"], pipe.scheduler, num_steps=s.num_steps,
                                 copies=copies, rng=rng, eta=s.eta, noise=batch.get("noise"),
                                 remat_policy=s.remat_policy, aux_fn=aux_fn)
  else:
    x0, aux = sample(pipe, s, denoiser(pipe, s, frozen["unet"], cond, lora=added), batch,
                     grad_steps=s.k, aux_fn=aux_fn, prefix_denoise=prefix)
  return pipe.decode(frozen["vae"], x0), aux


def eval_images(pipe, s: Sampler, lora_scale: float, lora, frozen, batch) -> jax.Array:
  """Î of the LoRA model (no gradient), for image panels and evaluation."""
  denoise = denoiser(pipe, s, frozen["unet"], conditioning(pipe, s, frozen, batch),
                     lora=lora_lib.collection(lora, lora_scale))
  x0, _ = sample(pipe, s, denoise, batch, grad_steps=0)
  return pipe.decode(frozen["vae"], x0)


# --- the objective and the step ---------------------------------------------------------------
def loss(pipe, reward: registry.Reward, s: Sampler, obj_cfg, lora_scale: float, lora, frozen,
         batch, rng, reference_images, region):
  """`region` is the reward's mask M of Î0; the objective uses it, or 1 everywhere when
  objective.mask = "ones", and the change metrics are measured against it either way."""
  mask = jnp.ones_like(region) if obj_cfg.mask == "ones" else region
  images, aux = generate(pipe, s, obj_cfg.gamma, lora_scale, lora, frozen, batch, rng, mask)
  copies = s.copies
  tile = lambda x: jnp.concatenate([x] * copies, axis=0)
  reference_images, mask = tile(reference_images), tile(mask)
  ids = reward_ids(reward, batch, copies)
  seen = objective.reward_input(images, mask, obj_cfg.reward_region)
  rewards = reward.score(frozen["reward"], seen, ids)
  total, metrics = objective.loss(rewards=rewards, images=images, reference=reference_images,
                                  mask=mask, cfg=obj_cfg, latent_term=aux, region=tile(region))
  return total, (metrics, images)


def train_step(loss_fn: Callable, reference_fn: Callable, tx: optax.GradientTransformation,
               optim_cfg, state: TrainState, frozen, batch, rng) -> tuple[TrainState, dict]:
  reference_images, mask = reference_fn(frozen, batch)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (metrics, _)), grads = grad_fn(state.lora, frozen, batch, rng, reference_images, mask)
  updates, opt_state = tx.update(grads, state.opt_state, state.lora)
  lora = optax.apply_updates(state.lora, updates)
  grad_norm, update_norm = optax.global_norm(grads), optax.global_norm(updates)
  # A step whose loss, gradients, update or new weights are not finite is not taken: the state
  # stays as it was (so whatever is checkpointed is good) and `nonfinite` tells the loop, which
  # stops at the next fetch naming this step. Four scalar checks, no host sync.
  finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
            & jnp.isfinite(optax.global_norm(lora)))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, grad_norm=grad_norm, update_norm=update_norm,
                 nonfinite=1.0 - finite.astype(jnp.float32),
                 lr=optimizer_lib.learning_rate(optim_cfg, state.opt_state,
                                                state.step // max(optim_cfg.grad_accum, 1)))
  return TrainState(step=state.step + 1, lora=keep(lora, state.lora),
                    opt_state=keep(opt_state, state.opt_state)), metrics


def init_state(tx: optax.GradientTransformation, lora_cfg, rng, unet_params,
               start=None) -> TrainState:
  """Step 0: the LoRA `start` (a tree: `Step.start`, from lora.init) or a fresh one from `rng`
  (B = 0: the base model)."""
  if start is None:
    lora = lora_lib.init(rng, unet_params, rank=lora_cfg.rank, pattern=lora_cfg.targets)
  else:
    lora = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), start)
  return TrainState(step=jnp.zeros((), jnp.int32), lora=lora, opt_state=tx.init(lora))


def start_lora(lora_cfg, unet_params) -> dict | None:
  """The LoRA tree of lora.init (None for ""), once its rank and layers are checked against
  config.lora: a mismatch raises validate.ConfigError naming both, before anything compiles.
  The file's A and B are taken as they are; config.lora.alpha sets the scale."""
  if not lora_cfg.init:
    return None
  key = f"config.lora.init = {lora_cfg.init!r}"
  try:
    weights = lora_io.read(lora_cfg.init, unet_params, where=key)
  except ValueError as e:
    raise validate.ConfigError(str(e)) from None
  if weights.rank != lora_cfg.rank:
    layer, rank = next((l, r) for l, r in sorted(weights.ranks.items()) if r != lora_cfg.rank)
    shape = np.shape(_at(weights.tree, layer)["lora_a"])
    raise validate.ConfigError(
        f"{key}: layer {'/'.join(layer)} has rank {rank} (lora_a {shape} [in, r]), but "
        f"config.lora.rank = {lora_cfg.rank} needs {(shape[0], lora_cfg.rank)}: set "
        f"--config.lora.rank={rank} (and lora.alpha), or start from a LoRA of rank "
        f"{lora_cfg.rank}")
  wanted = {p[:-1] for p in lora_lib.targets(unet_params, lora_cfg.targets)}
  have = set(weights.ranks)
  if have != wanted:
    name = lambda layers: ", ".join("/".join(l) for l in sorted(layers)[:3])
    raise validate.ConfigError(
        f"{key}: its layers are not those config.lora.targets = {lora_cfg.targets!r} selects: "
        f"{len(have - wanted)} in the file only (e.g. {name(have - wanted) or '-'}), "
        f"{len(wanted - have)} selected but not in the file (e.g. {name(wanted - have) or '-'})."
        " Set lora.targets to the file's layers")
  scale = lora_lib.scale(lora_cfg.rank, lora_cfg.alpha)
  file_scale = weights.single_scale()[1]
  logging.info("%s: training starts from its %d layers (rank %d; the file's alpha %s, scale "
               "%.4g); config.lora.alpha = %g applies: scale %.4g", key, len(have),
               weights.rank, weights.alpha, file_scale, lora_cfg.alpha, scale)
  if not np.isclose(file_scale, scale):
    logging.warning("%s: the file's scale %.4g is not config.lora.alpha / rank = %.4g: step 0 "
                    "is not the file's model (its A, B with another scale)", key, file_scale,
                    scale)
  return weights.tree


def _at(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def cached_reference(frozen, batch):
  del frozen
  return batch["reference"], batch["mask"]


class Step(NamedTuple):
  """The run's pure functions, bound to its pipeline, reward and config by `build`."""
  init_state: Callable  # (rng, unet_params[, start]) -> TrainState
  reference: Callable  # (frozen, batch) -> (Î0, M), computed by the frozen model
  loss: Callable  # (lora, frozen, batch, rng, Î0, M) -> (loss, (metrics, Î))
  train_step: Callable  # (state, frozen, batch, rng) -> (state, metrics)
  eval_images: Callable  # (lora, frozen, batch) -> Î
  tx: optax.GradientTransformation
  start: Any = None  # lora.init's tree (host numpy), for init_state; None: a fresh LoRA


def build(pipe, reward: registry.Reward, config) -> Step:
  """The step of `config` (validated by fnf_jax.validate) for this pipeline and reward. With
  lora.init, its LoRA is read and checked here (`start_lora`), before anything compiles."""
  s = Sampler.from_config(config, pipe)
  tx = optimizer_lib.optimizer(config.optim)
  lora_scale = lora_lib.scale(config.lora.rank, config.lora.alpha)
  reference_fn = functools.partial(reference, pipe, reward, s, config.mask)
  loss_fn = functools.partial(loss, pipe, reward, s, config.objective, lora_scale)
  step_reference = cached_reference if config.train.reference == "cache" else reference_fn
  return Step(
      init_state=functools.partial(init_state, tx, config.lora),
      reference=reference_fn,
      loss=loss_fn,
      train_step=functools.partial(train_step, loss_fn, step_reference, tx, config.optim),
      eval_images=functools.partial(eval_images, pipe, s, lora_scale),
      tx=tx,
      start=start_lora(config.lora, pipe.params["unet"]))
