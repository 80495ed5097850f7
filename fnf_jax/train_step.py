"""The Focus-N-Fix training step: one pure function, jitted by the loop with explicit shardings.

    train_step(state, frozen, batch, rng) -> (state, metrics)

state   TrainState: LoRA params, optimizer state, step (all that changes).
frozen  {"unet", "vae", "text_encoder"[, "text_encoder_2"], "reward"}: arguments, never
        closed over, so XLA does not constant-fold gigabytes of weights into the executable.
batch   {"ids", "neg_ids": [E, B, 77] int32, "x_T": [B, h, w, C], ["noise": [S, B, h, w, C]],
         ["reference": [B, H, W, 3], "mask": [B, H, W]] (cached reference mode)}.

Per example: Î0 and M come from the frozen model with the same x_T and sampler noise (cached, or
computed here without gradient); Î is sampled with the LoRA model, gradient through the last K
steps (or DRaFT-LV copies) and the VAE decoder; the objective is in `fnf_jax.objective`.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fnf_jax import objective
from fnf_jax import sampling
from fnf_jax.models import lora as lora_lib
from fnf_jax.rewards import masks
from fnf_jax.rewards import registry

GRADIENT_MODES = ("truncated", "lv", "full")
REFERENCE_MODES = ("online", "cache")
MASK_MODES = ("heatmap", "ones")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  lora: Any
  opt_state: Any


def _schedule_shape(cfg):
  """count -> multiplier of the learning rate in [0, 1]: linear warm-up, then constant or cosine."""
  if cfg.schedule not in ("constant", "cosine"):
    raise ValueError(f"optim.schedule {cfg.schedule!r} is not one of ['constant', 'cosine']")
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
  """AdamW with linear warm-up (then constant or cosine), global-norm clipping, accumulation.

  The rate and Adam's constants are injected hyperparameters: they live in the optimizer state,
  not in the compiled program, so runs that differ only in them share one compilation.
  """
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.lr, b1=cfg.b1, b2=cfg.b2,
                                            weight_decay=cfg.weight_decay),
      optax.scale_by_schedule(_schedule_shape(cfg)))
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx


def learning_rate(cfg, opt_state, update: jax.Array) -> jax.Array:
  """The rate the optimizer applies at optimizer update number `update` (for logging)."""
  # optax names the state class differently across versions; it always has `hyperparams`.
  is_injected = lambda x: hasattr(x, "hyperparams") and isinstance(x.hyperparams, dict)
  injected = [s for s in jax.tree.leaves(opt_state, is_leaf=is_injected) if is_injected(s)]
  return injected[0].hyperparams["learning_rate"] * _schedule_shape(cfg)(update)


class Step:
  """Builds the pure pieces of a run from its pipeline (modules), reward and config."""

  def __init__(self, pipe, reward: registry.Reward, config):
    self.pipe, self.reward, self.config = pipe, reward, config
    t = config.train
    for name, value, valid in (("train.gradient", t.gradient, GRADIENT_MODES),
                               ("train.reference", t.reference, REFERENCE_MODES),
                               ("objective.mask", config.objective.mask, MASK_MODES)):
      if value not in valid:
        raise ValueError(f"{name} = {value!r} is not one of {valid}")
    self.tx = optimizer(config.optim)
    self.lora_scale = lora_lib.scale(config.lora.rank, config.lora.alpha)

  # --- sampling -----------------------------------------------------------------------------
  @property
  def grad_steps(self) -> int:
    """K: the final sampling steps that carry gradient (DRaFT-LV re-noises instead: 0 here)."""
    t, s = self.config.train, self.config.sampling
    return {"truncated": t.grad_steps, "full": s.num_steps}.get(t.gradient, 0)

  def _conditioning(self, frozen, batch):
    return self.pipe.conditioning(frozen, batch["ids"], batch["neg_ids"],
                                  guided=self.config.sampling.guidance_scale > 1)

  def _denoiser(self, unet_params, conditioning, copies: int = 1):
    cond, uncond = conditioning
    if copies > 1:  # the same prompts for each re-noised copy (copy-major batch)
      tile = lambda c: jax.tree.map(lambda x: jnp.concatenate([x] * copies, axis=0), c)
      cond, uncond = tile(cond), tile(uncond)
    return self.pipe.denoiser(unet_params, cond, uncond, self.config.sampling.guidance_scale)

  def _sample(self, denoise, batch, *, grad_steps: int, aux_fn=None):
    """(x_0 latents, aux mean) of DDIM from the batch's x_T and sampler noise."""
    s = self.config.sampling
    return sampling.sample(denoise, batch["x_T"], self.pipe.scheduler, num_steps=s.num_steps,
                           eta=s.eta, noise=batch.get("noise"), grad_steps=grad_steps,
                           remat_policy=self.config.train.remat_policy, aux_fn=aux_fn)

  def reference(self, frozen, batch) -> tuple[jax.Array, jax.Array]:
    """(Î0 [B, H, W, 3], M [B, H, W]) from the frozen model, without gradient."""
    denoise = self._denoiser(frozen["unet"], self._conditioning(frozen, batch))
    # The same scan structure as the fine-tuned sample (prefix + K rematerialised steps), so that
    # with a zero LoRA the two are the same computation and Î == Î0 holds bit for bit.
    x0, _ = self._sample(denoise, batch, grad_steps=self.grad_steps)
    images = self.pipe.decode(frozen["vae"], x0)
    # The reward's region even when the objective ignores it (objective.mask = "ones", DRaFT):
    # the change inside / outside it is what compares the two methods.
    heat = self.reward.heatmap(frozen["reward"], images, batch["ids"])
    mask = masks.from_config(heat, images.shape[1:3], self.config.mask)
    return jax.lax.stop_gradient(images), jax.lax.stop_gradient(mask)

  def _generate(self, lora, frozen, batch, rng, mask):
    """Î with gradients w.r.t. the LoRA params, the latent-term aux (or None), and the number
    of copies per example (DRaFT-LV)."""
    cfg, s, t = self.config, self.config.sampling, self.config.train
    unet_params = lora_lib.merge(frozen["unet"], lora, scale=self.lora_scale)
    conditioning = self._conditioning(frozen, batch)  # encoded once, shared by every denoiser
    copies = t.lv_copies if t.gradient == "lv" else 1
    aux_fn = None
    if cfg.objective.gamma > 0:
      base = self._denoiser(frozen["unet"], conditioning, copies)
      m = jnp.concatenate([objective.latent_mask(mask, batch["x_T"].shape[1:3])] * copies, 0)
      aux_fn = lambda x, tt, out: objective.latent_difference(
          out, jax.lax.stop_gradient(base(x, tt)), m)
    denoise = self._denoiser(unet_params, conditioning)
    if t.gradient == "lv":
      x0, aux = sampling.sample_lv(denoise, self._denoiser(unet_params, conditioning, copies),
                                   batch["x_T"], self.pipe.scheduler, num_steps=s.num_steps,
                                   copies=copies, rng=rng, eta=s.eta, noise=batch.get("noise"),
                                   remat_policy=t.remat_policy, aux_fn=aux_fn)
    else:
      x0, aux = self._sample(denoise, batch, grad_steps=self.grad_steps, aux_fn=aux_fn)
    return self.pipe.decode(frozen["vae"], x0), aux, copies

  def loss(self, lora, frozen, batch, rng, reference, region):
    """`region` is the reward's mask M of Î0; the objective uses it, or 1 everywhere when
    objective.mask = "ones", and the change metrics are measured against it either way."""
    cfg = self.config
    mask = jnp.ones_like(region) if cfg.objective.mask == "ones" else region
    images, aux, copies = self._generate(lora, frozen, batch, rng, mask)
    tile = lambda x: jnp.concatenate([x] * copies, axis=0)
    reference, mask, ids = tile(reference), tile(mask), jnp.concatenate([batch["ids"]] * copies, 1)
    seen = objective.reward_input(images, mask, cfg.objective.reward_region)
    rewards = self.reward.score(frozen["reward"], seen, ids)
    total, metrics = objective.loss(rewards=rewards, images=images, reference=reference,
                                    mask=mask, cfg=cfg.objective, latent_term=aux,
                                    region=tile(region))
    return total, (metrics, images)

  # --- the step -----------------------------------------------------------------------------
  def init_state(self, rng, unet_params) -> TrainState:
    lora = lora_lib.init(rng, unet_params, rank=self.config.lora.rank,
                         pattern=self.config.lora.targets)
    return TrainState(step=jnp.zeros((), jnp.int32), lora=lora, opt_state=self.tx.init(lora))

  def references(self, frozen, batch):
    if self.config.train.reference == "cache":
      return batch["reference"], batch["mask"]
    return self.reference(frozen, batch)

  def train_step(self, state: TrainState, frozen, batch, rng) -> tuple[TrainState, dict]:
    reference, mask = self.references(frozen, batch)
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    (_, (metrics, _)), grads = grad_fn(state.lora, frozen, batch, rng, reference, mask)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    opt_cfg = self.config.optim
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   update_norm=optax.global_norm(updates),
                   lr=learning_rate(opt_cfg, state.opt_state,
                                    state.step // max(opt_cfg.grad_accum, 1)))
    return TrainState(step=state.step + 1, lora=lora, opt_state=opt_state), metrics

  def eval_images(self, lora, frozen, batch) -> jax.Array:
    """Î of the current LoRA model (no gradient), for image panels and evaluation."""
    unet_params = lora_lib.merge(frozen["unet"], lora, scale=self.lora_scale)
    denoise = self._denoiser(unet_params, self._conditioning(frozen, batch))
    x0, _ = self._sample(denoise, batch, grad_steps=0)
    return self.pipe.decode(frozen["vae"], x0)
