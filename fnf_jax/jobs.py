"""The job table: `config.job` names what `python -m fnf_jax.main` runs.

Each job is a "module:function" taking (config, workdir), imported only when it runs (a sample
job does not pay for the training stack's imports), and the "module:function" that checks its
config (`fnf_jax.validate`), which runs first and imports nothing heavy. Packages outside the
core (the toy world) add their jobs with `add` when `fnf_jax.plugins` imports them.
"""

import dataclasses
import importlib

from fnf_jax import plugins


@dataclasses.dataclass(frozen=True)
class Job:
  run: str  # "module:function"(config, workdir)
  check: str  # "module:function"(config), raises validate.ConfigError


_JOBS: dict[str, Job] = {
    "sample": Job("fnf_jax.sample:run", "fnf_jax.validate:sample_job"),
    "cache": Job("fnf_jax.train:cache", "fnf_jax.validate:training"),
    "train": Job("fnf_jax.train:train", "fnf_jax.validate:training"),
    "eval": Job("fnf_jax.eval_job:run", "fnf_jax.validate:evaluation"),
    "train_reward": Job("fnf_jax.train_reward:train", "fnf_jax.validate:reward_training"),
    "eval_reward": Job("fnf_jax.eval_reward:run", "fnf_jax.validate:reward_training"),
}


def add(name: str, run: str, check: str) -> None:
  if name in _JOBS:
    raise ValueError(f"job {name!r} registered twice")
  _JOBS[name] = Job(run, check)


def names() -> list[str]:
  plugins.load()
  return sorted(_JOBS)


def get(name: str) -> Job:
  """The job `name`; raises KeyError listing the valid names."""
  if name not in names():
    raise KeyError(f"config.job = {name!r} is not one of {names()}")
  return _JOBS[name]


def resolve(target: str):
  """"module:function" -> the function (importing the module)."""
  module, function = target.split(":")
  return getattr(importlib.import_module(module), function)
