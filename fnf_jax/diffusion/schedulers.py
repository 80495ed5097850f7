"""DDIM sampling as pure functions, reproducing diffusers' DDIMScheduler.

There is no scheduler object with a mutable `set_timesteps`: a frozen, hashable `DDIMConfig`
(pass it to `jax.jit` as a static argument, or close over it) plus the number of inference steps
determine everything. The noise schedule (`alphas_cumprod`) is computed in float64 with numpy,
cast to float32 and cached per config, so calling these functions inside a jitted sampling loop
embeds it once as a constant; a traced `timestep` indexes it with `jnp.take`.

Any diffusers checkpoint's scheduler_config.json can be read: DDIM only needs the noise schedule
(betas, prediction type, spacing), which PNDM / Euler / DPM configs describe with the same keys,
exactly as `DDIMScheduler.from_config(other_config)` does in diffusers.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

_warned_classes: set[str] = set()


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
  """DDIMScheduler's config; the defaults are diffusers' defaults."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  set_alpha_to_one: bool = True
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  rescale_betas_zero_snr: bool = False

  def __post_init__(self):
    for name, value, allowed in (("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                 ("prediction_type", self.prediction_type, PREDICTION_TYPES),
                                 ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)):
      if value not in allowed:
        raise ValueError(f"unsupported {name} {value!r}: supported are {allowed}")
    if self.trained_betas is not None:
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
      if len(self.trained_betas) != self.num_train_timesteps:
        raise ValueError(f"trained_betas has {len(self.trained_betas)} entries but "
                         f"num_train_timesteps is {self.num_train_timesteps}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DDIMConfig":
    """From any diffusers scheduler_config.json; keys DDIM has no use for are ignored.

    A config written for another scheduler class is accepted (its noise schedule is what DDIM
    samples with), which is logged once per class.
    """
    if d.get("thresholding"):
      raise ValueError("scheduler config has thresholding=true: dynamic thresholding is not "
                       "supported by fnf_jax's DDIM (it is meant for pixel-space models); set it "
                       "to false")
    class_name = d.get("_class_name")
    if class_name not in (None, "DDIMScheduler") and class_name not in _warned_classes:
      _warned_classes.add(class_name)
      logging.info("Scheduler config is for %s; sampling uses DDIM on that checkpoint's noise "
                   "schedule (as diffusers' DDIMScheduler.from_config would).", class_name)
    kwargs = {}
    for field in dataclasses.fields(cls):
      if d.get(field.name) is not None:  # absent or null: diffusers' default
        kwargs[field.name] = d[field.name]
    return cls(**kwargs)

  @classmethod
  def from_folder(cls, scheduler_dir: str) -> "DDIMConfig":
    """From a diffusers `scheduler/` folder (its scheduler_config.json)."""
    path = os.path.join(scheduler_dir, "scheduler_config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"scheduler config not found: {path!r}. Expected a diffusers "
                              "pipeline's scheduler/ folder holding scheduler_config.json.")
    with open(path) as f:
      return cls.from_dict(json.load(f))


def _betas(cfg: DDIMConfig) -> np.ndarray:
  t = cfg.num_train_timesteps
  if cfg.trained_betas is not None:
    return np.asarray(cfg.trained_betas, np.float64)
  if cfg.beta_schedule == "linear":
    return np.linspace(cfg.beta_start, cfg.beta_end, t, dtype=np.float64)
  if cfg.beta_schedule == "scaled_linear":  # the latent diffusion (SD) schedule
    return np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, t, dtype=np.float64) ** 2
  # squaredcos_cap_v2: GLIDE's cosine schedule, betas capped at 0.999.
  alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)])


def _rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
  """Shifts and scales sqrt(alphas_cumprod) so the last timestep is pure noise (SNR 0) while the
  first keeps its value (Lin et al. 2023, "Common Diffusion Noise Schedules ... are Flawed")."""
  s = np.sqrt(alphas_cumprod)
  s0, s_last = s[0], s[-1]
  s = (s - s_last) * (s0 / (s0 - s_last))
  return s ** 2


@functools.lru_cache(maxsize=16)
def _alphas_cumprod_cached(cfg: DDIMConfig) -> np.ndarray:
  out = np.cumprod(1.0 - _betas(cfg))
  if cfg.rescale_betas_zero_snr:
    out = _rescale_zero_terminal_snr(out)
  out = out.astype(np.float32)
  out.flags.writeable = False  # shared by every caller through the cache
  return out


def alphas_cumprod(cfg: DDIMConfig) -> np.ndarray:
  """float32 [num_train_timesteps]: the signal fraction alpha_bar_t of each training timestep.

  Computed in float64 (diffusers uses float32), so values agree with diffusers to ~1e-7.
  Read-only: it is cached.
  """
  return _alphas_cumprod_cached(cfg)


def final_alpha_cumprod(cfg: DDIMConfig) -> np.float32:
  """alpha_bar used for the step past t=0: 1 (a clean sample) or alpha_bar_0 when
  set_alpha_to_one is false (SD's configs)."""
  return np.float32(1.0) if cfg.set_alpha_to_one else alphas_cumprod(cfg)[0]


def timesteps(cfg: DDIMConfig, num_inference_steps: int) -> np.ndarray:
  """int32 [S], descending: the timesteps DDIMScheduler.set_timesteps(S) visits.

  Note diffusers applies steps_offset only to "leading" spacing.
  """
  t = cfg.num_train_timesteps
  s = int(num_inference_steps)
  if not 1 <= s <= t:
    raise ValueError(f"num_inference_steps={num_inference_steps} must be between 1 and "
                     f"num_train_timesteps={t}")
  if cfg.timestep_spacing == "linspace":
    out = np.linspace(0, t - 1, s).round()[::-1]
  elif cfg.timestep_spacing == "leading":
    out = (np.arange(0, s) * (t // s)).round()[::-1] + cfg.steps_offset
  else:  # trailing
    out = np.round(np.arange(t, 0, -t / s)) - 1
  return out.astype(np.int32)


def _expand(x: jax.Array, ndim: int) -> jax.Array:
  """[] or [B] per-sample coefficients -> broadcastable against a [B, ...] sample."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim)) if x.ndim else x


def _alpha_at(cfg: DDIMConfig, t) -> jax.Array:
  """alpha_bar_t for an int timestep, scalar or [B], traced or not; t < 0 -> the final alpha."""
  table = jnp.asarray(alphas_cumprod(cfg))
  t = jnp.asarray(t, jnp.int32)
  return jnp.where(t >= 0, jnp.take(table, jnp.maximum(t, 0)), final_alpha_cumprod(cfg))


def _x0_eps(prediction_type: str, model_output, a, sample):
  """(predicted x0, predicted noise) from the model's output, whatever it predicts."""
  sa, sb = jnp.sqrt(a), jnp.sqrt(1 - a)
  if prediction_type == "epsilon":
    return (sample - sb * model_output) / sa, model_output
  if prediction_type == "sample":
    return model_output, (sample - sa * model_output) / sb
  return sa * sample - sb * model_output, sa * model_output + sb * sample  # v_prediction


def step(cfg: DDIMConfig, model_output: jax.Array, timestep, sample: jax.Array, *,
         num_inference_steps: int, eta: float = 0.0,
         noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One DDIM update x_t -> x_{t - T//S}: returns (prev_sample, pred_original_sample).

  `timestep` may be traced (scalar, or [B] for per-sample timesteps); `num_inference_steps` must
  be a Python int. With eta > 0 the step is stochastic and the caller passes `noise` (standard
  normal, shaped like `sample`), which keeps this function pure; diffusers calls it
  `variance_noise`. `eta` may be traced only when `noise` is given.
  """
  if noise is None and not _is_zero(eta):
    raise ValueError("step with eta != 0 needs explicit `noise` (standard normal, the shape of "
                     "`sample`); pass noise=jax.random.normal(key, sample.shape)")
  if noise is not None and noise.shape != sample.shape:
    raise ValueError(f"noise has shape {noise.shape} but sample has shape {sample.shape}")
  t = jnp.asarray(timestep, jnp.int32)
  prev_t = t - cfg.num_train_timesteps // num_inference_steps
  a_t = _expand(_alpha_at(cfg, t), sample.ndim)
  a_prev = _expand(_alpha_at(cfg, prev_t), sample.ndim)

  pred_x0, pred_eps = _x0_eps(cfg.prediction_type, model_output, a_t, sample)
  if cfg.clip_sample:
    pred_x0 = jnp.clip(pred_x0, -cfg.clip_sample_range, cfg.clip_sample_range)

  # sigma_t of DDIM eq. 16; eta=1 is DDPM's posterior variance.
  variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
  std_dev_t = eta * jnp.sqrt(variance)
  # The max only guards rounding (the difference is >= 0 analytically for eta <= 1).
  direction = jnp.sqrt(jnp.maximum(1 - a_prev - std_dev_t ** 2, 0.0))
  prev_sample = jnp.sqrt(a_prev) * pred_x0 + direction * pred_eps
  if noise is not None:
    prev_sample = prev_sample + std_dev_t * noise
  # Coefficients are float32; keep the sample's dtype so a lax.scan carry stays fixed.
  return prev_sample.astype(sample.dtype), pred_x0.astype(sample.dtype)


def _is_zero(eta) -> bool:
  try:
    return float(eta) == 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False  # traced


def add_noise(cfg: DDIMConfig, x0: jax.Array, noise: jax.Array, t) -> jax.Array:
  """Forward diffusion q(x_t | x0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
  a = _expand(jnp.take(jnp.asarray(alphas_cumprod(cfg)), jnp.asarray(t, jnp.int32)), x0.ndim)
  return (jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise).astype(x0.dtype)
