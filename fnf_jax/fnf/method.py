"""Focus-N-Fix's parts on one batch, as pure functions: the prompts' conditioning, the guided
(LoRA) denoiser, the frozen model's reference Î0 and mask M, the latent term, and the image
objective of the final latents. `train_step` defines the loss and the step from them.

They take what they read of the config as arguments (`Sampler`, `objective.Objective`, the
`mask` block); `train_step.build` binds them. Params are arguments, never closed over.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fnf_jax.fnf import objective
from fnf_jax.diffusion import sampling
from fnf_jax.models import lora as lora_lib
from fnf_jax.rewards import masks
from fnf_jax.rewards import registry


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
  pipe = pipe.inference
  denoise = denoiser(pipe, s, frozen["unet"], conditioning(pipe, s, frozen, batch))
  # The same one-scan sampler as the training step's forward (step_pieces.forward), so that with
  # a zero LoRA the two are the same computation.
  x0, _ = sampling.trajectory(denoise, batch["x_T"], pipe.scheduler, num_steps=s.num_steps,
                              eta=s.eta, noise=batch.get("noise"))
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


def latent_term_fn(pipe, s: Sampler, latent: bool, frozen, batch, cond, mask):
  """aux_fn(x_t, t, ε_θ) -> [B] of the gradient steps: the latent ε-difference to the frozen
  model outside the (latent-grid) mask, or None without the γ-term
  (objective.Objective.computes_latent)."""
  if not latent:
    return None
  base = denoiser(pipe, s, frozen["unet"], cond, s.copies)
  m = jnp.concatenate([objective.latent_mask(mask, batch["x_T"].shape[1:3])] * s.copies, 0)
  return lambda x, t, out: objective.latent_difference(out, jax.lax.stop_gradient(base(x, t)), m)


def eval_images(pipe, s: Sampler, lora_scale: float, lora, frozen, batch) -> jax.Array:
  """Î of the LoRA model (no gradient), for image panels and evaluation."""
  pipe = pipe.inference
  denoise = denoiser(pipe, s, frozen["unet"], conditioning(pipe, s, frozen, batch),
                     lora=lora_lib.collection(lora, lora_scale))
  x0, _ = sample(pipe, s, denoise, batch, grad_steps=0)
  return pipe.decode(frozen["vae"], x0)


def objective_mask(obj: objective.Objective, region):
  """The mask the objective uses: the reward's region M of Î0, or 1 everywhere when
  objective.mask = "ones" (DRaFT)."""
  return jnp.ones_like(region) if obj.mask == "ones" else region


def image_loss(pipe, reward: registry.Reward, s: Sampler, obj: objective.Objective, frozen,
               batch, x0, reference_images, region, latent_term=None):
  """The objective at the final latents x_0 [copies · B, ...]: decode, reward, the constraint
  outside the mask (and the latent term when given); (loss, (metrics, Î)).

  `region` is the reward's mask M of Î0; the objective uses it, or 1 everywhere when
  objective.mask = "ones", and the change metrics are measured against it either way."""
  mask = objective_mask(obj, region)
  images = pipe.decode(frozen["vae"], x0)
  copies = s.copies
  tile = lambda x: jnp.concatenate([x] * copies, axis=0)
  reference_images, mask = tile(reference_images), tile(mask)
  seen = objective.reward_input(images, mask, obj.reward_region)
  rewards = reward.score(frozen["reward"], seen, reward_ids(reward, batch, copies))
  total, metrics = objective.loss(rewards=rewards, images=images, reference=reference_images,
                                  mask=mask, obj=obj, latent_term=latent_term,
                                  region=tile(region))
  return total, (metrics, images)
