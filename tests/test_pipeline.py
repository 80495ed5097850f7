"""Whole-pipeline parity: fnf_jax.diffusion.pipeline vs diffusers on tiny random SD1 / SD2 / SDXL folders."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_pipelines
from fnf_jax.diffusion import pipeline
from fnf_jax.diffusion import random_models
from fnf_jax.models import convert
from fnf_jax.models import vae as vae_lib

PROMPTS = ["a red circle", "a photo of a cat holding a sign"]
STEPS = 4


@pytest.fixture(scope="module", params=tiny_pipelines.FAMILIES)
def pipes(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  reference = tiny_pipelines.build(request.param, folder)
  return request.param, reference, pipeline.load(folder)


def _latents(pipe, seed=0):
  h, w, c = pipe.latent_shape
  return np.random.default_rng(seed).standard_normal((len(PROMPTS), h, w, c)).astype(np.float32)


def _reference(ref, latents, guidance_scale, negative_prompt):
  with torch.no_grad():
    out = ref(PROMPTS, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
              num_inference_steps=STEPS, guidance_scale=guidance_scale,
              negative_prompt=negative_prompt, output_type="np")
  return out.images


@pytest.mark.parametrize("guidance_scale,negative", [(1.0, None), (5.0, None),
                                                     (5.0, "a blue square")])
def test_images_match_diffusers(pipes, guidance_scale, negative):
  family, ref, ours = pipes
  latents = _latents(ours)
  expected = _reference(ref, latents, guidance_scale, [negative] * len(PROMPTS) if negative else None)
  got = ours.generate(PROMPTS, latents=latents, num_inference_steps=STEPS,
                      guidance_scale=guidance_scale, negative_prompt=negative or "")
  assert got.shape == expected.shape == (len(PROMPTS), ours.image_size, ours.image_size, 3)
  assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
  diff = np.abs(got - expected).max()
  assert diff <= 2e-3, f"{family}: max abs difference {diff}"
  # Guard against a vacuous comparison: the images are not flat.
  assert expected.std() > 1e-2


def test_training_reference_is_the_image_generate_makes(pipes):
  """Î0 of the training step (its conditioning, scan structure and decode) equals `generate`'s
  image for the same x_T, prompts and empty negative prompt: SDXL's zeroed unconditional
  branch included."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import violence  # pylint: disable=g-import-not-at-top
  from fnf_jax.fnf import train_step  # pylint: disable=g-import-not-at-top
  from fnf_jax.data import examples  # pylint: disable=g-import-not-at-top
  from fnf_jax.rewards import registry  # pylint: disable=g-import-not-at-top

  family, _, ours = pipes
  config = violence.get_config("runlocal")
  config.sampling.num_steps, config.sampling.guidance_scale = STEPS, 5.0
  config.sampling.negative_prompt = ""
  reward = registry.build(config.reward)
  step = train_step.build(ours, reward, config)
  batch = examples.host_batch(ours, examples.make_examples(PROMPTS, 1, 0), negative_prompt="",
                              num_steps=STEPS, eta=0.0)
  batch.pop("index")
  reference, _ = jax.jit(step.reference)({**ours.params, "reward": reward.params}, batch)
  got = ours.generate(PROMPTS, latents=batch["x_T"], num_inference_steps=STEPS,
                      guidance_scale=5.0, negative_prompt="")
  diff = np.abs(np.asarray(reference) - got).max()
  assert diff <= 1e-5, f"{family}: max abs difference {diff}"
  assert got.std() > 1e-2


def test_seed_reproducible_and_eta(pipes):
  family, _, ours = pipes
  if family != "sd1":
    pytest.skip("family-independent; checked on sd1 only to save compile time")
  a = ours.generate(PROMPTS[:1], seed=3, num_inference_steps=2, guidance_scale=2.0)
  b = ours.generate(PROMPTS[:1], seed=3, num_inference_steps=2, guidance_scale=2.0)
  c = ours.generate(PROMPTS[:1], seed=4, num_inference_steps=2, guidance_scale=2.0)
  d = ours.generate(PROMPTS[:1], seed=3, num_inference_steps=2, guidance_scale=2.0, eta=1.0)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3 and np.abs(a - d).max() > 1e-4


def test_missing_folder_names_the_path(tmp_path):
  with pytest.raises(convert.CheckpointError, match="model_index.json"):
    pipeline.load(str(tmp_path / "nowhere"))


def test_missing_component_names_it(tmp_path):
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  with pytest.raises(convert.CheckpointError, match="unet"):
    pipeline.load(str(tmp_path))


def test_unsupported_pipeline_class(tmp_path):
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
  with pytest.raises(convert.CheckpointError, match="FluxPipeline.*StableDiffusionPipeline"):
    pipeline.load(str(tmp_path))


def test_sample_job_writes_pngs_and_index(tmp_path):
  from fnf_jax import main  # pylint: disable=g-import-not-at-top
  from configs import sample as sample_config  # pylint: disable=g-import-not-at-top

  folder = str(tmp_path / "model")
  tiny_pipelines.build("sd1", folder)
  config = sample_config.get_config()
  config.model.path = folder
  config.prompts.texts = tuple(PROMPTS)
  config.seeds = (0, 1)
  config.batch_size = 3
  config.sampling.num_steps = 2
  records = main.run_job(config, str(tmp_path / "work"))
  out = tmp_path / "work" / "samples"
  meta = json.loads((out / "samples.json").read_text())
  assert len(records) == len(meta["images"]) == 4
  assert {(r["prompt"], r["seed"]) for r in meta["images"]} == {(p, s) for p in PROMPTS for s in (0, 1)}
  for r in meta["images"]:
    assert os.path.getsize(out / r["file"]) > 100


def test_abstract_params_are_traced_once_per_model_and_input_shapes(monkeypatch):
  # A run's setup and its random pipeline, and every later run in the process, ask for the
  # same models' abstract params: traced once, each caller given its own containers.
  traced = []
  trace = convert._abstract_params  # pylint: disable=protected-access
  monkeypatch.setattr(convert, "_abstract_params",
                      lambda *a: traced.append(a[0]) or trace(*a))
  monkeypatch.setattr(convert, "_ABSTRACT", {})
  module = random_models.random_pipeline(weights=False).vae
  images = vae_lib.dummy_images(module.config)
  first = convert.abstract_params(module, images)
  again = convert.abstract_params(module.clone(), jnp.ones(images.shape))  # equal, not the same
  assert len(traced) == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), first) == jax.tree.map(
      lambda x: (x.shape, x.dtype), again)
  first["decoder"] = None  # a caller's edit reaches no one else
  assert convert.abstract_params(module, images)["decoder"]
  # Another input shape or another model is traced again.
  convert.abstract_params(module, jnp.zeros((1, 32, 32, 3)))
  convert.abstract_params(module.clone(dtype=jnp.bfloat16), images)
  assert len(traced) == 3
