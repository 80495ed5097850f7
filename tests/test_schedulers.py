"""DDIM (fnf_jax.diffusion.schedulers) against diffusers' DDIMScheduler."""

import functools
import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from fnf_jax.diffusion import schedulers

# Stable Diffusion 1.5's scheduler/scheduler_config.json.
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _both(**kw):
  return schedulers.DDIMConfig.from_dict(kw), DDIMScheduler(**kw)


def _close(ours, ref, tol=1e-5):
  """max |ours - ref| <= tol, with tol relative where |ref| > 1 (x0 at high noise can reach ~100,
  where float32 itself resolves only ~1e-5)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= tol * max(1.0, np.abs(ref).max()), err


@pytest.mark.parametrize("spacing", schedulers.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(spacing, offset):
  cfg, ref = _both(timestep_spacing=spacing, steps_offset=offset)
  for steps in (1, 3, 7, 10, 20, 50, 999, 1000):
    ref.set_timesteps(steps)
    ours = schedulers.timesteps(cfg, steps)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{steps} steps")


def test_too_many_steps_raises():
  with pytest.raises(ValueError, match="num_train_timesteps=1000"):
    schedulers.timesteps(schedulers.DDIMConfig(), 1001)


@pytest.mark.parametrize("kw", [
    {}, SD, dict(beta_schedule="squaredcos_cap_v2"),
    dict(SD, rescale_betas_zero_snr=True), dict(trained_betas=list(np.linspace(1e-4, 0.02, 1000))),
])
@pytest.mark.parametrize("one", [True, False])
def test_alphas_cumprod_match_diffusers(kw, one):
  cfg, ref = _both(set_alpha_to_one=one, **kw)
  ours = schedulers.alphas_cumprod(cfg)
  assert ours.dtype == np.float32 and ours.shape == (1000,)
  # float64 here vs float32 in diffusers.
  np.testing.assert_allclose(ours, ref.alphas_cumprod.numpy(), rtol=5e-5, atol=1e-6)
  np.testing.assert_allclose(schedulers.final_alpha_cumprod(cfg), ref.final_alpha_cumprod.numpy(),
                             rtol=1e-6)
  if kw.get("rescale_betas_zero_snr"):
    assert ours[-1] == 0.0


STEP_CASES = {
    "eps_alpha_one": (dict(SD, clip_sample=False), 0.0),
    "eps_sd_pndm_like": (dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 0.0),
    "eps_eta": (dict(SD, clip_sample=False, set_alpha_to_one=False), 0.7),
    "eps_ddpm_eta1": (dict(SD, clip_sample=False), 1.0),
    "v_pred": (dict(SD, prediction_type="v_prediction", clip_sample=False), 0.0),
    "v_pred_eta": (dict(SD, prediction_type="v_prediction", set_alpha_to_one=False), 0.5),
    "sample_pred": (dict(SD, prediction_type="sample", clip_sample=False), 0.0),
    "clip_linear": ({}, 0.0),  # diffusers' defaults: linear betas, clip_sample to [-1, 1]
    "clip_range": (dict(clip_sample=True, clip_sample_range=0.5, beta_schedule="squaredcos_cap_v2"),
                   0.3),
    "zero_snr_trailing": (dict(SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                               timestep_spacing="trailing", clip_sample=False), 0.0),
    "zero_snr_trailing_eta": (dict(SD, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   timestep_spacing="trailing", clip_sample=False,
                                   set_alpha_to_one=False), 0.5),
    # (eta=1 at the zero-SNR step makes the direction coefficient sqrt(1 - a_prev - sigma^2) the
    # square root of a cancellation whose exact value is 0: diffusers returns sqrt(rounding noise)
    # there, ~3e-4, so that combination is not compared.)
    "linspace": (dict(SD, timestep_spacing="linspace", clip_sample=False), 0.0),
}


@pytest.mark.parametrize("name", sorted(STEP_CASES))
def test_step_matches_diffusers(name):
  kw, eta = STEP_CASES[name]
  cfg, ref = _both(**kw)
  steps = 10
  ref.set_timesteps(steps)
  rng = np.random.RandomState(0)
  shape = (2, 4, 8, 8)
  sample = rng.randn(*shape).astype(np.float32)
  # Jitted with a traced timestep, as in a sampling loop.
  fn = jax.jit(functools.partial(schedulers.step, cfg, num_inference_steps=steps, eta=eta))
  for t in schedulers.timesteps(cfg, steps):
    model_output = rng.randn(*shape).astype(np.float32)
    noise = rng.randn(*shape).astype(np.float32)
    out = ref.step(torch.from_numpy(model_output), int(t), torch.from_numpy(sample), eta=eta,
                   variance_noise=torch.from_numpy(noise) if eta > 0 else None)
    prev, x0 = fn(model_output, jnp.int32(t), sample, noise=noise if eta > 0 else None)
    _close(x0, out.pred_original_sample.numpy())
    _close(prev, out.prev_sample.numpy())
    sample = out.prev_sample.numpy()  # follow diffusers' trajectory


def test_step_per_sample_timesteps_and_dtype():
  cfg = schedulers.DDIMConfig.from_dict(dict(SD, clip_sample=False))
  rng = np.random.RandomState(1)
  sample, out = rng.randn(2, 4, 4, 4).astype(np.float32), rng.randn(2, 4, 4, 4).astype(np.float32)
  ts = np.array([981, 21], np.int32)
  prev, x0 = schedulers.step(cfg, out, ts, sample, num_inference_steps=50)
  for i, t in enumerate(ts):
    p_i, x_i = schedulers.step(cfg, out[i:i + 1], int(t), sample[i:i + 1], num_inference_steps=50)
    np.testing.assert_allclose(prev[i:i + 1], p_i, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x0[i:i + 1], x_i, rtol=1e-6, atol=1e-6)
  prev_bf16, _ = schedulers.step(cfg, out.astype(jnp.bfloat16), 981, sample.astype(jnp.bfloat16),
                                 num_inference_steps=50)
  assert prev_bf16.dtype == jnp.bfloat16  # a lax.scan carry keeps its dtype


def test_step_with_eta_needs_noise():
  cfg = schedulers.DDIMConfig()
  x = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="noise"):
    schedulers.step(cfg, x, 500, x, num_inference_steps=10, eta=0.5)
  with pytest.raises(ValueError, match="shape"):
    schedulers.step(cfg, x, 500, x, num_inference_steps=10, eta=0.5, noise=jnp.zeros((1, 2)))


def _velocity(cfg, x0, eps, t):
  """The v-prediction target sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (diffusers'
  get_velocity, checked against it below)."""
  a = np.asarray(schedulers.alphas_cumprod(cfg))[t].reshape(-1, 1, 1, 1)
  return (np.sqrt(a) * eps - np.sqrt(1 - a) * x0).astype(np.float32)


@pytest.mark.parametrize("pred", schedulers.PREDICTION_TYPES)
def test_the_step_recovers_x0_whatever_the_model_predicts(pred):
  cfg = schedulers.DDIMConfig.from_dict(dict(SD, prediction_type=pred, clip_sample=False))
  rng = np.random.RandomState(2)
  x0, eps = rng.randn(2, 4, 4, 4).astype(np.float32), rng.randn(2, 4, 4, 4).astype(np.float32)
  t = np.array([10, 700], np.int32)
  xt = schedulers.add_noise(cfg, x0, eps, t)
  target = {"epsilon": eps, "sample": x0, "v_prediction": _velocity(cfg, x0, eps, t)}[pred]
  _, got_x0 = schedulers.step(cfg, target, t, xt, num_inference_steps=10)
  np.testing.assert_allclose(got_x0, x0, atol=2e-5)


def test_add_noise_and_velocity_match_diffusers():
  cfg, ref = _both(**SD)
  rng = np.random.RandomState(3)
  x0, eps = rng.randn(3, 4, 4, 4).astype(np.float32), rng.randn(3, 4, 4, 4).astype(np.float32)
  t = np.array([0, 499, 999])
  tx, te, tt = torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)
  _close(schedulers.add_noise(cfg, x0, eps, t), ref.add_noise(tx, te, tt).numpy())
  _close(_velocity(cfg, x0, eps, t), ref.get_velocity(tx, te, tt).numpy())


def test_pndm_config_gives_diffusers_ddim_schedule():
  schedulers._warned_classes.discard("PNDMScheduler")
  with mock.patch.object(schedulers.logging, "info") as info:
    cfg = schedulers.DDIMConfig.from_dict(SD15_PNDM)
    schedulers.DDIMConfig.from_dict(SD15_PNDM)
  assert info.call_count == 1  # once, not per call
  assert "PNDMScheduler" in info.call_args[0][1]
  ref = DDIMScheduler.from_config(SD15_PNDM)
  assert (cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample) == (1, False, False)
  ref.set_timesteps(50)
  np.testing.assert_array_equal(schedulers.timesteps(cfg, 50), ref.timesteps.numpy())
  np.testing.assert_allclose(schedulers.alphas_cumprod(cfg), ref.alphas_cumprod.numpy(),
                             rtol=5e-6, atol=1e-7)
  x = np.random.RandomState(4).randn(1, 4, 4, 4).astype(np.float32)
  for t in (981, 1):  # first step and the last one (prev timestep < 0 -> final alpha)
    out = ref.step(torch.from_numpy(x), t, torch.from_numpy(x))
    prev, x0 = schedulers.step(cfg, x, t, x, num_inference_steps=50)
    _close(prev, out.prev_sample.numpy())
    _close(x0, out.pred_original_sample.numpy())


def test_config_errors_and_folder(tmp_path):
  with pytest.raises(ValueError, match="thresholding"):
    schedulers.DDIMConfig.from_dict({"thresholding": True})
  with pytest.raises(ValueError, match="squaredcos_cap_v2"):
    schedulers.DDIMConfig.from_dict({"beta_schedule": "sigmoid"})
  with pytest.raises(ValueError, match="v_prediction"):
    schedulers.DDIMConfig.from_dict({"prediction_type": "flow"})
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "scheduler_config.json")):
    schedulers.DDIMConfig.from_folder(str(tmp_path))
  (tmp_path / "scheduler_config.json").write_text(json.dumps(
      {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "thresholding": False,
       "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
       "timestep_spacing": "trailing"}))
  cfg = schedulers.DDIMConfig.from_folder(str(tmp_path))
  assert cfg == schedulers.DDIMConfig(prediction_type="v_prediction", timestep_spacing="trailing")
  hash(cfg)  # usable as a static jit argument
