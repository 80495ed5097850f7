"""Entry point for every job: `python -m fnf_jax.main --config=configs/<x>.py --workdir=DIR`.

The config's `job` field names what runs (sample, cache, train, ...). Nothing but this file
reads flags.
"""

import importlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration (a configs/*.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")

# job name -> "module:function" taking (config, workdir); imported lazily so that a sample job
# does not pay for the training stack's imports.
JOBS = {
    "sample": "fnf_jax.sample:run",
    "cache": "fnf_jax.train:cache",
    "train": "fnf_jax.train:train",
}


def run_job(config, workdir: str):
  if config.job not in JOBS:
    raise ValueError(f"config.job = {config.job!r} is not one of {sorted(JOBS)}")
  module, fn = JOBS[config.job].split(":")
  return getattr(importlib.import_module(module), fn)(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (where outputs, checkpoints and logs go)")
  logging.info("job %s, workdir %s", _CONFIG.value.job, _WORKDIR.value)
  run_job(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
