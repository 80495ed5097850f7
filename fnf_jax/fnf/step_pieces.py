"""The training step in pieces, each compiled as its own program:

    sampled = forward(lora, frozen, batch, rng)                # S DDIM steps, no gradient
    metrics, g_x0 = image_grads(frozen, batch, x0, Î0, M)      # decode, reward, constraint: d/dx_0
    grads, latent = lora_grads(lora, frozen, batch, sampled, g_x0, M)  # back through K steps
    state, metrics = update(state, obj, grads, metrics, latent)  # optimizer, non-finite guard

The objective's weights are inputs, `frozen["objective"]` (objective.Objective), not constants:
another β, γ or reward weight runs the same programs (fnf_jax/fnf/sweep.py stacks them).

`run(pieces, state, frozen, batch, rng)` is the step: `train_step.build` binds the pieces, the
training loop compiles each (fnf_jax/runtime/compilation.py) and runs the same `run` on the compiled
ones, and `jax.jit` of the bound step is one program of the same computation.

Why pieces: compiling. As one program the step held the UNet's forward three times (the
no-gradient steps, the gradient steps' forward, their recomputation in the backward) and XLA's
compile time grows with program size; here the forward is compiled once for all S sampling
steps, the gradient steps are one VJP per step from the inputs `forward` kept
(sampling.backprop), and each program compiles while the next is traced. The result is the gradient of
`train_step.loss` (tests/test_step_pieces.py checks it against autodiff, every gradient mode).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fnf_jax.fnf import method
from fnf_jax.fnf import objective
from fnf_jax.runtime import optimizer as optimizer_lib
from fnf_jax.diffusion import sampling
from fnf_jax.diffusion import schedulers
from fnf_jax.models import lora as lora_lib


class Sampled(NamedTuple):
  """What `forward` hands to the gradient pieces."""
  x0: jax.Array  # the final latents [copies · B, h, w, C]
  xs: jax.Array  # the inputs of the steps that carry gradient [K, copies · B, h, w, C]
  cond: Any  # (cond, uncond): the prompts' UNet conditioning, encoded once


class Pieces(NamedTuple):
  """The step's functions; `run` calls them in this order."""
  reference: Callable  # (frozen, batch) -> (Î0, M): the cache's, or the frozen model's
  forward: Callable  # (lora, frozen, batch, rng) -> Sampled
  image_grads: Callable  # (frozen, batch, x0, Î0, M) -> (metrics, d loss / d x0)
  lora_grads: Callable  # (lora, frozen, batch, Sampled, g_x0, M) -> (grads, latent term)
  update: Callable  # (state, objective, grads, metrics, latent term) -> (state, metrics)


def run(pieces: Pieces, state, frozen, batch, rng):
  """One training step: (state, metrics)."""
  reference_images, region = pieces.reference(frozen, batch)
  sampled = pieces.forward(state.lora, frozen, batch, rng)
  metrics, g_x0 = pieces.image_grads(frozen, batch, sampled.x0, reference_images, region)
  grads, latent = pieces.lora_grads(state.lora, frozen, batch, sampled, g_x0, region)
  return pieces.update(state, frozen["objective"], grads, metrics, latent)


def gradient_schedule(pipe, s, batch) -> tuple[jax.Array, jax.Array, float]:
  """(timesteps [K], sampler noise [K, ...], eta) of the steps that carry gradient: the last K
  of the chain, or DRaFT-LV's one deterministic step at the last timestep."""
  ts = jnp.asarray(schedulers.timesteps(pipe.scheduler, s.num_steps))
  if s.gradient == "lv":
    return ts[-1:], jnp.zeros((1, 1)), 0.0
  noise = batch.get("noise")
  if noise is None:
    noise = jnp.zeros((s.num_steps, 1))  # never read at eta = 0
  return ts[s.num_steps - s.k:], noise[s.num_steps - s.k:], s.eta


def forward(pipe, s, lora_scale: float, lora, frozen, batch, rng) -> Sampled:
  """The LoRA model's sample from the batch's x_T, without gradient; for DRaFT-LV, x_0
  re-noised `copies` times and denoised by the last step (train_step.loss's copies)."""
  pipe = pipe.inference  # no gradient here: nothing to rematerialise
  cond = method.conditioning(pipe, s, frozen, batch)
  added = lora_lib.collection(jax.lax.stop_gradient(lora), lora_scale)
  denoise = method.denoiser(pipe, s, frozen["unet"], cond, lora=added)
  x0, xs = sampling.trajectory(denoise, batch["x_T"], pipe.scheduler, num_steps=s.num_steps,
                               eta=s.eta, noise=batch.get("noise"), keep=s.k)
  if s.gradient == "lv":
    x_t = sampling.renoise(x0, pipe.scheduler, num_steps=s.num_steps, copies=s.copies, rng=rng)
    copies = method.denoiser(pipe, s, frozen["unet"], cond, s.copies, added)
    ts, _, _ = gradient_schedule(pipe, s, batch)
    x0 = sampling.step_fn(copies, pipe.scheduler, s.num_steps, 0.0)(x_t, (ts[0], None))[0]
    xs = x_t[None]
  return Sampled(x0=x0, xs=xs, cond=cond)


def image_grads(pipe, reward, s, frozen, batch, x0, reference_images,
                region) -> tuple[dict, jax.Array]:
  """The image terms of the objective (method.image_loss) at x_0, and their gradient."""
  f = lambda x: method.image_loss(pipe, reward, s, frozen["objective"], frozen, batch, x,
                                  reference_images, region)
  (_, (metrics, _)), g_x0 = jax.value_and_grad(f, has_aux=True)(x0)
  return metrics, g_x0


def lora_grads(pipe, s, lora_scale: float, lora, frozen, batch, sampled: Sampled, g_x0,
               region) -> tuple[Any, jax.Array]:
  """The LoRA's gradient back through the steps that carry gradient, from x_0's (and, with
  the γ-term, the latent term's) gradient; and the latent term's value (0 without it)."""
  obj = frozen["objective"]
  mask = method.objective_mask(obj, region)
  aux_fn = method.latent_term_fn(pipe, s, obj.computes_latent, frozen, batch, sampled.cond,
                                 mask)
  ts, noise, eta = gradient_schedule(pipe, s, batch)

  def step(p, x, t, n):
    denoise = method.denoiser(pipe, s, frozen["unet"], sampled.cond, s.copies,
                                  lora_lib.collection(p, lora_scale))
    return sampling.step_fn(denoise, pipe.scheduler, s.num_steps, eta, aux_fn)(x, (t, n))

  return sampling.backprop(step, lora, sampled.xs, ts, noise, g_x0, aux_weight=obj.gamma,
                           remat_policy=s.remat_policy)


def update(tx: optax.GradientTransformation, optim_cfg, state, obj: objective.Objective, grads,
           metrics, latent) -> tuple[Any, dict]:
  """The optimizer step; a step whose loss, gradients, update or new weights are not finite is
  not taken."""
  if obj.computes_latent:
    _, metrics = objective.add_latent_term(metrics["loss"], metrics, latent, obj)
  updates, opt_state = tx.update(grads, state.opt_state, state.lora)
  lora = optax.apply_updates(state.lora, updates)
  grad_norm, update_norm = optax.global_norm(grads), optax.global_norm(updates)
  # The state stays as it was (so whatever is checkpointed is good) and `nonfinite` tells the
  # loop, which stops at the next fetch naming this step. Four scalar checks, no host sync.
  finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
            & jnp.isfinite(optax.global_norm(lora)))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, grad_norm=grad_norm, update_norm=update_norm,
                 nonfinite=1.0 - finite.astype(jnp.float32),
                 lr=optimizer_lib.learning_rate(optim_cfg, state.opt_state,
                                                state.step // max(optim_cfg.grad_accum, 1)))
  return state.replace(step=state.step + 1, lora=keep(lora, state.lora),
                       opt_state=keep(opt_state, state.opt_state)), metrics
