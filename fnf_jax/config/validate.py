"""`validate(config)`: every choice and range of a config, checked before anything is loaded.

`python -m fnf_jax.main` (and `main.run_job`) call it first: it imports nothing heavy (no jax),
reads no model, and each message names the key, the value and the valid values, so a typo costs
a second, not a model load and a compile. The job (`config.job`) picks the rule set: `training`
for train / cache, `sample_job` for sample, and each plugin's own (the toy world's in its
checks.py). What needs the devices (the batch against a mesh axis of -1, the cluster) is the
second phase, fnf_jax/runtime/preflight.py, which main runs next.
"""

import math
import re

from fnf_jax.config import choices
from fnf_jax.data import reward_datasets
from fnf_jax.config import inputs as inputs_lib
from fnf_jax.config import sweep
from fnf_jax.config.errors import ConfigError
# The checks' vocabulary (each message names the key, the value and what is valid); the plugins'
# checks use it through this module.
from fnf_jax.config.fields import boolean, integer, number, one_of, text, value
from fnf_jax.config.inputs import existing, lora_source, prompt_file
from fnf_jax import jobs
from fnf_jax.evaluation import judges
from fnf_jax.rewards import registry


def validate(config) -> list[inputs_lib.Input]:
  """Raises ConfigError for the first invalid value of `config` (its job picks the rules), or
  MissingInputs naming every file and folder it names that is not there; returns those inputs
  (what a run would read)."""
  job = value(config, "job")
  if job not in jobs.names():
    raise ConfigError(f"config.job = {job!r} is not one of {jobs.names()}")
  with inputs_lib.gathering_inputs() as inputs:
    try:
      jobs.resolve(jobs.get(job).check)(config)
    except ConfigError as e:
      missing = [i for i in dict.fromkeys(inputs) if not i.present]
      if missing:  # a bad value after missing inputs: say both at once
        raise ConfigError(f"{e}\n{inputs_lib.MissingInputs(missing)}") from None
      raise
  inputs = list(dict.fromkeys(inputs))  # a rule set may check one input twice (the toy demo)
  missing = [i for i in inputs if not i.present]
  if missing:
    raise inputs_lib.MissingInputs(missing)
  return inputs


# --- rule sets --------------------------------------------------------------------------------
def model(config, *, tiny_ok: bool) -> None:
  if not (tiny_ok and value(config, "model.path") == "tiny"):
    existing(config, "model.path", folder=True, inside="model_index.json")
  one_of(config, "model.dtype", choices.DTYPES)
  one_of(config, "model.attention", choices.ATTENTION)


def prompts(config) -> None:
  one_of(config, "prompts.source", choices.PROMPT_SOURCES)
  if value(config, "prompts.source") == "list":
    texts = value(config, "prompts.texts")
    if not texts or not all(isinstance(t, str) for t in texts):
      raise ConfigError(f"config.prompts.texts = {texts!r} is not valid: prompts.source = "
                        "'list' needs a non-empty tuple of prompts")
  elif value(config, "prompts.path") or value(config, "prompts.source") != "parti":
    # (parti with no path reads the copy fnf_jax ships)
    if existing(config, "prompts.path", folder=False):
      prompt_file(value(config, "prompts.path"), value(config, "prompts.source"))
  if value(config, "prompts.source") in ("parti", "i2p"):  # read through TFDS (prompts.py)
    text(config, "prompts.data_dir")
  number(config, "prompts.eval_fraction", 0.0, 1.0, open_high=True)


def reward(config, key: str = "reward") -> None:
  """The reward block at `key` (config.reward; the eval job's extra rewards, eval.rewards.*)."""
  name = value(config, f"{key}.name")
  entries = registry.entries()
  if name not in entries:
    raise ConfigError(f"config.{key}.name = {name!r} is not one of {tuple(sorted(entries))}")
  for field in entries[name].fields:
    value(config, f"{key}.{field}")
  have = value(config, key).keys()
  if "dtype" in have:
    one_of(config, f"{key}.dtype", choices.DTYPES)
  if "saliency" in have:
    one_of(config, f"{key}.saliency", choices.SALIENCY_METHODS)
  if "remat" in have:
    boolean(config, f"{key}.remat")
  if "gradcam_sigma" in have:
    number(config, f"{key}.gradcam_sigma", 0.0)
  if "sigma" in have:
    number(config, f"{key}.sigma", 0.0, open_low=True)
  if "scale" in have:
    number(config, f"{key}.scale", 0.0, open_low=True)
  if "prompt_encoder" in have:
    integer(config, f"{key}.prompt_encoder", 0, 1)
  if "max_prompt_tokens" in have:
    integer(config, f"{key}.max_prompt_tokens", 2)
  if entries[name].fields == registry.RAHF_FIELDS and value(config, f"{key}.weights") != "tiny":
    # Checked here, before the diffusion model loads ("tiny": random weights, no folders).
    existing(config, f"{key}.vit_path", folder=True)
    existing(config, f"{key}.t5_path", folder=True)
    existing(config, f"{key}.weights", folder=False)
  if "clip_path" in have:  # the CLIP rewards (and the heads on CLIP: q16, laion_*)
    existing(config, f"{key}.clip_path", folder=None)
    for field in ("tokenizer", "prompt_tokenizer"):
      if field in have and value(config, f"{key}.{field}"):
        existing(config, f"{key}.{field}", folder=True)
    if "weights" in entries[name].fields:
      existing(config, f"{key}.weights", folder=False)
  if "color" in have:
    color = value(config, f"{key}.color")
    if len(color) != 3 or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in color):
      raise ConfigError(f"config.{key}.color = {color!r} is not valid: it must be an RGB "
                        "triple in [0, 1]")


def mesh(config) -> None:
  sizes = dict(value(config, "mesh"))
  if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1)
                      for s in sizes.values()) or list(sizes.values()).count(-1) > 1:
    raise ConfigError(f"config.mesh = {sizes} is not valid: axis sizes must be integers >= 1, "
                      "with at most one -1 (all remaining devices)")
  for logical, axes in value(config, "sharding_rules"):
    named = axes if isinstance(axes, (tuple, list)) else (axes,)
    unknown = [a for a in named if a is not None and a not in sizes]
    if unknown:
      raise ConfigError(f"config.sharding_rules maps {logical!r} to mesh axes {unknown}, which "
                        f"config.mesh does not have; its axes are {tuple(sizes)}")
  # A sweep's members each see the whole batch: it is split over the other axes.
  check_batch(config, sweep.batch_devices(sizes))


def distributed_explicit(d) -> bool:
  """Whether config.distributed names the cluster by hand (any field set)."""
  return bool(d.coordinator) or d.num_processes > 0 or d.process_id >= 0


def distributed(config) -> None:
  """config.distributed: off, all three fields given, or none (the cluster is detected when the
  runtime starts, fnf_jax/runtime/distributed.py)."""
  boolean(config, "distributed.enabled")
  text(config, "distributed.coordinator")
  integer(config, "distributed.num_processes", 0)
  integer(config, "distributed.process_id", -1)
  d = value(config, "distributed")
  if not d.enabled or not distributed_explicit(d):
    return
  missing = [name for name, bad in (("coordinator", not d.coordinator),
                                    ("num_processes", d.num_processes < 1),
                                    ("process_id", d.process_id < 0)) if bad]
  if missing:
    raise ConfigError(
        "config.distributed.enabled = True with part of the cluster given by hand: also set "
        + ", ".join(f"--config.distributed.{m}" for m in missing)
        + f" (have coordinator={d.coordinator!r}, num_processes={d.num_processes}, "
        f"process_id={d.process_id}), or leave all three empty / 0 / -1 on a cluster JAX "
        "detects (TPU pods, GKE TPU jobs, SLURM, Open MPI)")
  host, _, port = d.coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"config.distributed.coordinator = {d.coordinator!r} is not HOST:PORT "
                      "(process 0's address, e.g. 10.0.0.2:1234)")
  if d.process_id >= d.num_processes:
    raise ConfigError(f"config.distributed.process_id = {d.process_id} is not below "
                      f"config.distributed.num_processes = {d.num_processes}: process ids are "
                      "0 .. num_processes - 1")


def compile_block(config) -> None:
  """config.compile (fnf_jax/runtime/compilation.py), which every job's config has."""
  text(config, "compile.cache_dir")
  number(config, "compile.min_compile_secs", 0.0)
  text(config, "compile.xla_flags")
  bad = [f for f in value(config, "compile.xla_flags").split() if not f.startswith("--")]
  if bad:
    raise ConfigError(f"config.compile.xla_flags = {value(config, 'compile.xla_flags')!r}: "
                      f"{bad[0]!r} is not an XLA flag (each starts with --, e.g. "
                      "--xla_gpu_autotune_level=0)")


def check_batch(config, devices: int, key: str = "data.batch_size") -> None:
  """A global batch (config.<key>) must split into whole examples over `devices` (the mesh
  size, or here the product of its fixed axes before the devices are known)."""
  batch = value(config, key)
  if batch % devices:
    raise ConfigError(f"config.{key} = {batch} is not divisible by the mesh size "
                      f"{devices} (the devices of all processes; config.mesh = "
                      f"{dict(value(config, 'mesh'))}): each device needs whole examples; use "
                      "a multiple of it")


def training(config) -> None:
  """The Focus-N-Fix / DRaFT training configs (configs/focus_n_fix.py documents every field)."""
  integer(config, "seed", 0)
  distributed(config)
  compile_block(config)
  model(config, tiny_ok=True)
  boolean(config, "model.unet_remat")
  boolean(config, "model.vae_remat")
  prompts(config)
  integer(config, "data.batch_size", 1)
  integer(config, "data.seeds_per_prompt", 1)
  number(config, "data.min_mask_area", 0.0, 1.0)
  integer(config, "data.prefetch", 0)
  integer(config, "sampling.num_steps", 1)
  number(config, "sampling.guidance_scale", 0.0)
  text(config, "sampling.negative_prompt")
  number(config, "sampling.eta", 0.0, 1.0)
  integer(config, "lora.rank", 1)
  number(config, "lora.alpha", 0.0, open_low=True)
  targets = value(config, "lora.targets")
  try:
    re.compile(targets)
  except (re.error, TypeError) as e:
    raise ConfigError(f"config.lora.targets = {targets!r} is not a valid regex: {e}") from None
  integer(config, "train.num_steps", 1)
  one_of(config, "train.gradient", choices.GRADIENT_MODES)
  steps = value(config, "sampling.num_steps")
  integer(config, "train.grad_steps", 1, steps)  # K <= the sampling steps
  integer(config, "train.lv_copies", 1)
  one_of(config, "train.remat_policy", choices.REMAT_POLICIES)
  one_of(config, "train.reference", choices.REFERENCE_MODES)
  lora_source(config, "lora.init")
  # Not read by training (it may name this very run's workdir, not there yet): the jobs that
  # read it check that it exists.
  text(config, "model.lora")
  if value(config, "data.min_mask_area") > 0 and value(config, "train.reference") != "cache":
    raise ConfigError(
        f"config.data.min_mask_area = {value(config, 'data.min_mask_area')} selects examples by "
        f"their cached mask: it needs config.train.reference = 'cache', not "
        f"{value(config, 'train.reference')!r} (or min_mask_area = 0)")
  one_of(config, "objective.mask", choices.MASK_MODES)
  one_of(config, "objective.reward_region", choices.REWARD_REGIONS)
  number(config, "objective.reward_weight", 0.0, open_low=True)
  number(config, "objective.beta", 0.0)
  one_of(config, "objective.constraint_norm", choices.CONSTRAINT_NORMS)
  number(config, "objective.gamma", 0.0)
  sweep.check(config)
  one_of(config, "mask.threshold_mode", choices.THRESHOLD_MODES)
  if value(config, "mask.threshold_mode") == "quantile":
    number(config, "mask.threshold", 0.0, 1.0)
  else:
    number(config, "mask.threshold", 0.0)
  integer(config, "mask.dilation", 0)
  number(config, "mask.blur", 0.0)
  one_of(config, "mask.gate", choices.MASK_GATES)
  number(config, "mask.gate_threshold", -math.inf)
  reward(config)
  optim(config)
  mesh(config)
  integer(config, "cache.shard_size", 1)
  one_of(config, "cache.dtype", choices.CACHE_DTYPES)
  checkpoint_and_log(config)
  eval_block(config)


# Adam moves each weight by about lr a step: above 1 a step outweighs the weights themselves, and
# a run at lr = 1e30 stopped only after compiling, at its first non-finite loss.
MAX_LR = 1.0


def optim(config) -> None:
  number(config, "optim.lr", 0.0, MAX_LR, open_low=True)
  one_of(config, "optim.schedule", choices.LR_SCHEDULES)
  integer(config, "optim.warmup_steps", 0)
  integer(config, "optim.decay_steps", 1)
  number(config, "optim.b1", 0.0, 1.0, open_high=True)
  number(config, "optim.b2", 0.0, 1.0, open_high=True)
  number(config, "optim.weight_decay", 0.0)
  number(config, "optim.grad_clip", 0.0, open_low=True)
  integer(config, "optim.grad_accum", 1)


def checkpoint_and_log(config) -> None:
  integer(config, "checkpoint.every", 1)
  integer(config, "checkpoint.keep", 1)
  integer(config, "log.every", 1)
  integer(config, "log.image_every", 0)
  boolean(config, "log.tensorboard")


def reward_training(config) -> None:
  """configs/rahf.py (train_reward, eval_reward)."""
  from fnf_jax.rewards import trainable  # pylint: disable=import-outside-toplevel
  integer(config, "seed", 0)
  distributed(config)
  compile_block(config)
  one_of(config, "data.name", reward_datasets.names())
  dataset = reward_datasets.get(value(config, "data.name"))
  if dataset.manual:
    existing(config, "data.manual_dir", folder=True)
  text(config, "data.data_dir")
  text(config, "data.builder_config")
  integer(config, "data.batch_size", 1)
  integer(config, "data.workers", 0)
  one_of(config, "model.name", trainable.names())
  family = value(config, "model.name")
  have = set(value(config, "model").keys()) - {"name"}
  want = set(trainable.FAMILIES.get(family).fields)
  if have != want:
    raise ConfigError(f"config.model (model.name = {family!r}) must have exactly the fields "
                      f"{sorted(want)}: missing {sorted(want - have)}, unknown {sorted(have - want)}")
  integer(config, "model.seed", 0)
  if family == "rahf":
    if value(config, "model.weights") != "tiny":
      existing(config, "model.vit_path", folder=True)
      existing(config, "model.t5_path", folder=True)
      if value(config, "model.weights"):
        existing(config, "model.weights", folder=False)
    one_of(config, "model.dtype", ("float32", "bfloat16"))
    boolean(config, "model.remat")
    integer(config, "model.max_prompt_tokens", 2)
  elif value(config, "model.weights"):
    existing(config, "model.weights", folder=False)
  one_of(config, "loss.heatmap", ("mse", "bce"))
  number(config, "loss.heatmap_weight", 0.0)
  number(config, "loss.score_weight", 0.0)
  optim(config)
  integer(config, "train.num_steps", 1)
  mesh(config)
  checkpoint_and_log(config)
  one_of(config, "eval.split", (dataset.train_split,) + tuple(dataset.eval_splits))
  integer(config, "eval.batch_size", 1)
  text(config, "eval.weights")
  if value(config, "eval.weights") not in ("", "init"):
    existing(config, "eval.weights", folder=False)
  number(config, "eval.threshold", 0.0, 1.0, open_high=True)
  integer(config, "eval.html_examples", 0)


def sample_job(config) -> None:
  """configs/sample.py."""
  distributed(config)
  compile_block(config)
  model(config, tiny_ok=False)
  lora_source(config, "model.lora")
  prompts(config)
  one_of(config, "prompts.split", choices.PROMPT_SPLITS)
  seeds = value(config, "seeds")
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                          for s in seeds):
    raise ConfigError(f"config.seeds = {seeds!r} is not valid: it must be a non-empty tuple of "
                      "integers >= 0 (one image per prompt and seed)")
  integer(config, "batch_size", 1)
  integer(config, "sampling.num_steps", 1)
  number(config, "sampling.guidance_scale", 0.0)
  text(config, "sampling.negative_prompt")


def evaluation(config) -> None:
  """The eval job: a training config (configs/focus_n_fix.py) with its block `eval`."""
  training(config)


BASE_METHOD = "base"  # the eval job's name for the base model: no run may take it


def eval_block(config) -> None:
  """Block `eval` of a training config, checked with the rest of it: a bad value fails the
  training run at once, not the evaluation after it."""
  runs = value(config, "eval.runs")
  if not isinstance(runs, (tuple, list)) or not all(isinstance(r, str) for r in runs):
    raise ConfigError(f"config.eval.runs = {runs!r} is not valid: a tuple of 'NAME=WORKDIR' "
                      "strings (or () for --workdir itself)")
  names = []
  for spec in runs:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path or name == BASE_METHOD:
      raise ConfigError(f"config.eval.runs entry {spec!r} is not NAME=WORKDIR (NAME "
                        f"not {BASE_METHOD!r})")
    names.append(name)
  if len(set(names)) != len(names):
    raise ConfigError(f"config.eval.runs names {names} are not distinct")
  integer(config, "eval.seeds_per_prompt", 1)
  integer(config, "eval.seed_offset", 0)
  integer(config, "eval.max_prompts", 0)
  integer(config, "eval.grid_rows", 1)
  number(config, "eval.judge_threshold", -math.inf)
  for key in value(config, "eval.rewards").keys():
    reward(config, f"eval.rewards.{key}")
  rewards = tuple(sorted(value(config, "eval.rewards").keys()))
  analytic = tuple(judges.names())
  clash = sorted(set(rewards) & set(analytic))
  if clash:
    raise ConfigError(f"config.eval.rewards keys {clash} are also judges' names "
                      f"({list(analytic)}); rename them so that eval.judge says which it means")
  one_of(config, "eval.judge", ("",) + rewards + analytic)

