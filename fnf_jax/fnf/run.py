"""A Focus-N-Fix run's pieces, built once from a validated config: the mesh, the models and
the reward (loaded and placed), the training examples and the step's functions. The train, cache
and eval jobs and the toy demo each take a `Run` from `setup`.
"""

import dataclasses

import jax
from absl import logging

from fnf_jax.data import examples as examples_lib
from fnf_jax.data import prompts as prompts_lib
from fnf_jax.diffusion import pipeline as pipeline_lib
from fnf_jax.diffusion import random_models
from fnf_jax.fnf import train_step
from fnf_jax.models import lora_io
from fnf_jax.rewards import registry
from fnf_jax.runtime import distributed
from fnf_jax.runtime import sharding


@dataclasses.dataclass
class Run:
  """Everything a job needs, built once from the config."""
  config: object
  pipe: pipeline_lib.Pipeline
  reward: registry.Reward
  step: train_step.Step
  mesh: jax.sharding.Mesh
  rules: tuple
  frozen: dict
  frozen_shardings: dict
  examples: list
  # step.reference / step.eval_images jitted once for the run (cache job, panels, evaluation).
  reference_fn: object
  eval_images_fn: object


def load_pipeline(config) -> pipeline_lib.Pipeline:
  if config.model.path == "tiny":
    return random_models.random_pipeline(config.seed, attention_impl=config.model.attention,
                                         unet_remat=config.model.unet_remat,
                                         vae_remat=config.model.vae_remat)
  return pipeline_lib.load(config.model.path, dtype=config.model.dtype,
                           attention_impl=config.model.attention,
                           unet_remat=config.model.unet_remat, vae_remat=config.model.vae_remat)


def training_examples(config, pipe, split: str = "train", reward=None) -> list:
  prompts, _ = prompts_lib.load(config.prompts, split,
                                limits=examples_lib.prompt_limits(pipe, reward))
  return examples_lib.make_examples(prompts, config.data.seeds_per_prompt, config.seed)


# What the loaded weights depend on: a Run of another config may share them when these agree.
SHARED_WEIGHTS = ("model", "reward", "mesh", "sharding_rules", "distributed")


def setup(config, base: Run | None = None) -> Run:
  """The run of a validated `config` (fnf_jax.config.validate): mesh, models, reward, examples, step.

  `base`: a Run whose config agrees on SHARED_WEIGHTS; its mesh, pipeline, reward and placed
  weights are reused, and only this config's step and examples are built (the demo's DRaFT and
  Focus-N-Fix runs load the model once).
  """
  if base is None:
    distributed.initialize(config.distributed)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.rules(config.sharding_rules)
    pipe = load_pipeline(config)
    reward = registry.build(config.reward)
    abstract = pipe.abstract_params()
    model_shardings = {name: sharding.logical_shardings(abstract[name], mesh, rules)
                       for name in abstract}
    model_shardings["reward"] = jax.tree.map(lambda _: sharding.replicated(mesh), reward.params)
    models = sharding.put({**pipe.params, "reward": reward.params}, model_shardings)
  else:
    differ = [k for k in SHARED_WEIGHTS if _json(config[k]) != _json(base.config[k])]
    if differ:
      raise ValueError(f"setup(config, base=...): config.{differ[0]} differs from the base run's;"
                       f" a run shares the loaded weights only when {SHARED_WEIGHTS} agree")
    mesh, rules, pipe, reward = base.mesh, base.rules, base.pipe, base.reward
    models = {k: v for k, v in base.frozen.items() if k != "objective"}
    model_shardings = {k: v for k, v in base.frozen_shardings.items() if k != "objective"}
  start = lora_io.start(config.lora, pipe.params["unet"])  # lora.init's file, read and checked
  step = train_step.build(pipe, reward, config, start)
  # The objective's weights: inputs of the step like the models (stacked over a sweep's members).
  weights = sharding.stacked(mesh) if step.members else sharding.replicated(mesh)
  # Placed by a program (as the step keys are): device_put of host values checks that every
  # process passed the same, and that check fails on Python-float scalars.
  frozen = {**models, "objective": jax.jit(lambda: step.objective, out_shardings=weights)()}
  frozen_shardings = {**model_shardings, "objective": weights}
  return Run(config=config, pipe=pipe, reward=reward, step=step, mesh=mesh, rules=rules,
             frozen=frozen, frozen_shardings=frozen_shardings,
             examples=training_examples(config, pipe, reward=reward),
             reference_fn=jax.jit(step.reference), eval_images_fn=jax.jit(step.eval_images))


def _json(value) -> str:
  return value.to_json() if hasattr(value, "to_json") else repr(value)


def select_examples(config, examples: list, cached) -> list:
  """The examples to train on: all, or (data.min_mask_area > 0) those whose cached mask M of Î0
  covers at least that fraction of the image, i.e. where the reward found something to fix."""
  threshold = config.data.min_mask_area
  if threshold <= 0:
    return examples
  # `cached` is there: validate.training refuses min_mask_area > 0 without the cache.
  chosen = [e for e in examples if cached.area(e.index) >= threshold]
  logging.info("data.min_mask_area = %g: training on %d of %d examples", threshold, len(chosen),
               len(examples))
  if len(chosen) < config.data.batch_size:
    raise ValueError(f"only {len(chosen)} of {len(examples)} examples have a mask covering >= "
                     f"{threshold} of the image, fewer than one batch ({config.data.batch_size}):"
                     " lower data.min_mask_area or add prompts / data.seeds_per_prompt")
  return chosen


def step_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(LoRA init key, root of the per-step keys `fold_in(root, step)`): two halves of one split,
  so the init key is none of the step keys."""
  init_key, root = jax.random.split(jax.random.key(seed))
  return init_key, root
