"""The DDIM sampling loop as one `lax.scan`, with classifier-free guidance and gradient truncation.

The loop is written once and serves both generation and training:
- generation runs every step without gradient;
- DRaFT-K training runs the first S−K steps under `stop_gradient` (they cost no memory) and the
  last K steps with gradient, each rematerialised so that only the step inputs are kept;
- "full" backpropagation is K = S.

The training step takes its gradient in pieces instead (`trajectory`, then `backprop`): one
scan samples all S steps without gradient and keeps the inputs of the last K, and the gradient
goes back through those K steps one step's VJP at a time. The UNet's forward is then compiled
once for sampling (not once for the prefix and again for the gradient steps' forward), and
`train_step.loss` (through `sample`, autodiff end to end) is the definition it is tested against.

The denoiser is a function `eps(x, t) -> model_output` that already applies guidance (see
`guided`), so the loop knows nothing about UNets, LoRA or text encoders.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from fnf_jax.config import choices
from fnf_jax.diffusion import schedulers

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
AuxFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# What the backward pass of a gradient step keeps (see choices.REMAT_POLICIES).
REMAT_POLICIES = {name: getattr(jax.checkpoint_policies, name) for name in choices.REMAT_POLICIES}


def guided(model: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], cond: jax.Array,
           uncond: jax.Array | None, guidance_scale: float | jax.Array) -> Denoiser:
  """Classifier-free guidance with one batched UNet call, as diffusers does it.

  `model(x, t, context_index)` is called on the batch [uncond; cond] stacked along the batch axis
  (context chosen by `cond` / `uncond`, which are whatever per-example conditioning pytrees the
  model closes over). With `uncond=None` guidance is off and the model runs once.
  """
  if uncond is None:
    return lambda x, t: model(x, t, cond)
  both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

  def eps(x, t):
    out = model(jnp.concatenate([x, x], axis=0), t, both)
    out_uncond, out_cond = jnp.split(out, 2, axis=0)
    return out_uncond + guidance_scale * (out_cond - out_uncond)

  return eps


def step_fn(denoise: Denoiser, cfg: schedulers.DDIMConfig, num_steps: int, eta: float,
             aux_fn: AuxFn | None = None):
  def body(x, inputs):
    t, noise = inputs
    out = denoise(x, t)
    x_prev, _ = schedulers.step(cfg, out, t, x, num_inference_steps=num_steps, eta=eta,
                                noise=noise if eta > 0 else None)
    aux = aux_fn(x, t, out) if aux_fn is not None else None
    return x_prev.astype(x.dtype), aux

  return body


def _schedule(cfg: schedulers.DDIMConfig, x_T: jax.Array, num_steps: int, k: int, eta: float,
              noise: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(timesteps [S], sampler noise [S, ...]) after checking K and the noise eta needs."""
  if not 0 <= k <= num_steps:
    raise ValueError(f"grad_steps (K) must be in [0, {num_steps}], got {k}")
  if eta > 0 and noise is None:
    raise ValueError("eta > 0 needs explicit sampler noise of shape [num_steps, *x_T.shape]")
  if noise is None:
    noise = jnp.zeros((num_steps,) + (1,) * x_T.ndim, x_T.dtype)  # never read when eta == 0
  return jnp.asarray(schedulers.timesteps(cfg, num_steps)), noise


def sample(denoise: Denoiser, x_T: jax.Array, cfg: schedulers.DDIMConfig, *, num_steps: int,
           eta: float = 0.0, noise: jax.Array | None = None, grad_steps: int = 0,
           remat_policy: str = "nothing_saveable", aux_fn: AuxFn | None = None,
           prefix_denoise: Denoiser | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Runs DDIM from x_T; returns (x_0 latents, mean of aux_fn over the gradient steps or None).

  Args:
    denoise: guided model output for (x, t); see `guided`.
    x_T: initial latents [B, h, w, C].
    cfg: the DDIM settings (from the checkpoint's scheduler_config.json).
    num_steps: number of DDIM steps S.
    eta: DDIM stochasticity; > 0 needs `noise`.
    noise: [S, B, h, w, C] sampler noise for eta > 0 (explicit, so that the reference and the
      fine-tuned model see the same noise).
    grad_steps: K, how many final steps carry gradient; 0 means none (pure generation) and the
      whole chain is under stop_gradient; S means full backpropagation.
    remat_policy: a key of REMAT_POLICIES, for the gradient steps.
    aux_fn: (x_t, t, model_output) -> [B], evaluated on the gradient steps only (e.g. the
      latent ε-difference term); its mean over those steps is returned.
    prefix_denoise: the same model for the S − K steps without gradient, built from
      stop-gradient parameters (default: `denoise`), so that those steps keep nothing for the
      backward pass without relying on dead-code elimination.
  """
  ts, noise = _schedule(cfg, x_T, num_steps, grad_steps, eta, noise)
  x, aux = x_T, None
  split = num_steps - grad_steps
  if split > 0:
    x, _ = jax.lax.scan(step_fn(prefix_denoise or denoise, cfg, num_steps, eta), x,
                        (ts[:split], noise[:split]))
    x = jax.lax.stop_gradient(x)
  if grad_steps > 0:
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    body = jax.checkpoint(step_fn(denoise, cfg, num_steps, eta, aux_fn),
                          policy=REMAT_POLICIES[remat_policy])
    x, aux = jax.lax.scan(body, x, (ts[split:], noise[split:]))
    aux = None if aux is None else jnp.mean(aux, axis=0)
  return x, aux


def sample_lv(denoise: Denoiser, denoise_copies: Denoiser, x_T: jax.Array,
              cfg: schedulers.DDIMConfig, *, num_steps: int, copies: int, rng: jax.Array, eta: float = 0.0, noise: jax.Array | None = None,
              remat_policy: str = "nothing_saveable",
              aux_fn: AuxFn | None = None) -> tuple[jax.Array, jax.Array | None]:
  """DRaFT-LV: x_0 without gradient, re-noised `copies` times to the last timestep, each copy
  denoised by one step with gradient. Returns ([copies · B, h, w, C] latents, copy-major, aux).

  `denoise_copies` is the same denoiser for the batch tiled `copies` times (copy-major). The
  copies cost K = 1 each but lower the variance of the reward gradient (Clark et al., 2024).
  """
  x0, _ = sample(denoise, x_T, cfg, num_steps=num_steps, eta=eta, noise=noise)
  x_t = renoise(x0, cfg, num_steps=num_steps, copies=copies, rng=rng)
  t_last = jnp.asarray(schedulers.timesteps(cfg, num_steps))[-1]
  body = jax.checkpoint(step_fn(denoise_copies, cfg, num_steps, 0.0, aux_fn),
                        policy=REMAT_POLICIES[remat_policy])
  return body(x_t, (t_last, None))


def renoise(x0: jax.Array, cfg: schedulers.DDIMConfig, *, num_steps: int, copies: int,
            rng: jax.Array) -> jax.Array:
  """DRaFT-LV's copies: x_0 noised `copies` times to the last timestep, [copies · B, ...]
  copy-major, without gradient."""
  t_last = jnp.asarray(schedulers.timesteps(cfg, num_steps))[-1]
  eps = jax.random.normal(rng, (copies,) + x0.shape, x0.dtype)
  x_t = jax.vmap(lambda e: schedulers.add_noise(cfg, x0, e, t_last))(eps)
  return jax.lax.stop_gradient(x_t.reshape((copies * x0.shape[0],) + x0.shape[1:]))


def trajectory(denoise: Denoiser, x_T: jax.Array, cfg: schedulers.DDIMConfig, *,
               num_steps: int, eta: float = 0.0, noise: jax.Array | None = None,
               keep: int = 0) -> tuple[jax.Array, jax.Array]:
  """DDIM from x_T in one scan, without gradient: (x_0, the inputs x_t of the last `keep`
  steps [keep, B, h, w, C], in step order), what `backprop` starts from."""
  ts, noise = _schedule(cfg, x_T, num_steps, keep, eta, noise)
  one = step_fn(denoise, cfg, num_steps, eta)
  split = num_steps - keep

  def body(carry, inputs):
    x, kept, i = carry
    # Write x into slot i - split once the gradient steps begin (slot 0 rewritten before).
    slot = jnp.maximum(i - split, 0)
    kept = kept.at[slot].set(jnp.where(i >= split, x, kept[slot]))
    return (one(x, inputs)[0], kept, i + 1), None

  kept = jnp.zeros((max(keep, 1),) + x_T.shape, x_T.dtype)
  (x, kept, _), _ = jax.lax.scan(body, (x_T, kept, jnp.int32(0)), (ts, noise))
  return jax.lax.stop_gradient(x), jax.lax.stop_gradient(kept[:keep])


def backprop(step: Callable, params, xs: jax.Array, ts: jax.Array, noise: jax.Array,
             g_out: jax.Array, *, aux_weight: float = 0.0,
             remat_policy: str = "nothing_saveable") -> tuple[object, jax.Array]:
  """The gradient w.r.t. `params` of  <g_out, x_0> + aux_weight · mean(aux)  through the steps
  whose inputs `xs` [K, B, ...] `trajectory` kept: reverse mode by hand, last step first, one
  step's VJP at a time (only one step's residuals are ever alive).

  step(params, x_t, t, noise) -> (x_prev, aux [B] or None); ts [K], noise [K, ...] per step.
  Returns (gradient tree like params, mean of aux over the steps and examples; 0 without aux).
  `remat_policy` (REMAT_POLICIES) says what each step's forward keeps for its backward; with
  nothing_saveable the UNet runs once per step here (its primal outputs are not used, so
  XLA drops the first evaluation), unless the aux term needs its value.
  """
  k = xs.shape[0]
  policy = REMAT_POLICIES[remat_policy]

  def body(carry, inputs):
    g_x, g_p = carry
    x, t, n = inputs

    def f(p, x):
      x_prev, aux = step(p, x, t, n)
      return x_prev, jnp.zeros((), jnp.float32) if aux is None else jnp.mean(aux)

    (_, aux), vjp = jax.vjp(jax.checkpoint(f, policy=policy), params, x)
    d_p, d_x = vjp((g_x, jnp.float32(aux_weight / k)))
    return (d_x.astype(g_x.dtype), jax.tree.map(jnp.add, g_p, d_p)), aux

  zeros = jax.tree.map(jnp.zeros_like, params)
  (_, grads), auxs = jax.lax.scan(body, (g_out, zeros), (xs, ts, noise), reverse=True)
  return grads, jnp.mean(auxs)
