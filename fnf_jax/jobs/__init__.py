"""The job table: `config.job` names what `python -m fnf_jax.main` runs.

Each job is a "module:function" taking (config, workdir), imported only when it runs (a sample
job does not pay for the training stack's imports), and the "module:function" that checks its
config (`fnf_jax.config.validate`), which runs first and imports nothing heavy. Packages outside the
core (the toy world) add their jobs with `add` when `fnf_jax.plugins` imports them. The table is
a `fnf_jax.registry.Registry`; the functions below are its names in this module.
"""

import dataclasses

from fnf_jax.registry import Registry, resolve


@dataclasses.dataclass(frozen=True)
class Job:
  run: str  # "module:function"(config, workdir)
  check: str  # "module:function"(config), raises validate.ConfigError


JOBS = Registry("job", "config.job", {
    "sample": Job("fnf_jax.jobs.sample:run", "fnf_jax.config.validate:sample_job"),
    "cache": Job("fnf_jax.jobs.cache:cache", "fnf_jax.config.validate:training"),
    "train": Job("fnf_jax.jobs.train:train", "fnf_jax.config.validate:training"),
    "eval": Job("fnf_jax.jobs.evaluate:run", "fnf_jax.config.validate:evaluation"),
    "train_reward": Job("fnf_jax.jobs.train_reward:train", "fnf_jax.config.validate:reward_training"),
    "eval_reward": Job("fnf_jax.jobs.eval_reward:run", "fnf_jax.config.validate:reward_training"),
})

names = JOBS.names
get = JOBS.get  # raises KeyError: "config.job = 'NAME' is not one of [...]"
__all__ = ["Job", "JOBS", "add", "names", "get", "resolve"]


def add(name: str, run: str, check: str) -> None:
  JOBS.add(name, Job(run, check))
