"""Entry point for every job: `python -m fnf_jax.main --config=configs/<x>.py --workdir=DIR`.

The config's `job` field names what runs (fnf_jax/jobs.py: sample, cache, train, and the jobs of
plugins such as the toy world's). The config is validated first (fnf_jax/config/validate.py), before
anything heavy is imported. Nothing but this file reads flags.
"""

import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fnf_jax.runtime import compilation
from fnf_jax.config import errors
from fnf_jax import jobs
from fnf_jax.config import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration (a configs/*.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")
_CHECK = flags.DEFINE_boolean(
    "check", False, "Only check: the config, every input it names, the mesh; print what the run "
    "would read, the mesh, the weights' memory per device and the compilation cache's folder, "
    "and exit (0: ready; 2: what is wrong or missing). Nothing loads or compiles.")


class _QuietLibraries:
  """Drops INFO records of libraries that log every internal step: orbax writes ~20 lines per
  checkpoint save, which buries the training log. Warnings and errors pass."""

  NOISY = (f"{os.sep}orbax{os.sep}",)

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def run_job(config, workdir: str):
  """Validates `config` (statically, then against the devices), then runs its job (the job's
  module is imported only now)."""
  validate.validate(config)
  # Imported only now: it needs jax, and a bad value must fail before jax loads.
  from fnf_jax.runtime import preflight  # pylint: disable=import-outside-toplevel
  preflight.check(config)
  compilation.setup(config.compile, workdir)
  return jobs.resolve(jobs.get(config.job).run)(config, workdir)


def check(config, workdir: str) -> str:
  """--check: both phases of checking `config`, and the report of what a run would do."""
  inputs = validate.validate(config)
  from fnf_jax.runtime import plan, preflight  # pylint: disable=import-outside-toplevel
  return plan.describe(config, workdir, inputs, preflight.check(config))


def unknown_override(config, argv: list[str]) -> str | None:
  """A message naming the first `--config.a.b=...` override whose key is not in `config`."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node, walked = config, []
    for key in path:
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        where = ".".join(walked) or "the config"
        return (f"unknown config key {'.'.join(path)!r} in {arg!r}: {where} has no {key!r}. "
                f"Valid keys of {where}: {', '.join(keys)}")
      node, walked = node[key], walked + [key]
  return None


def _load_config_file(argv: list[str]):
  spec = _config_spec(argv)
  if spec is None:
    return None
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("fnf_config_check", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()


def _fatal(message: str):
  print(f"FATAL: {message}", file=sys.stderr)
  sys.exit(2)


def _config_spec(argv: list[str]) -> str | None:
  return next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, where every mistake in the command line is one FATAL line and exit 2:
  a config file that is not there or rejects its argument (`:runlocall`), an override of a key
  the config lacks (the valid keys listed) or of the wrong type (`train.num_steps=abc`)."""
  spec = _config_spec(argv)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]):
    _fatal(f"--config={spec}: no such config file {spec.partition(':')[0]!r} (from the working "
           f"directory {os.getcwd()}); the configs are the .py files of the checkout's configs/")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    message = None
    try:
      message = unknown_override(_load_config_file(argv), argv)
    except Exception:  # pylint: disable=broad-except  # fall back to ml_collections' message
      pass
    _fatal(message or e)
  except flags.Error as e:
    try:
      _load_config_file(argv)
    except Exception as load_error:  # pylint: disable=broad-except  # the config file's own
      _fatal(f"--config={spec}: {type(load_error).__name__}: {load_error}")
    # An override's value the config's type rejects: absl's first line names flag and value.
    _fatal(f"{str(e).splitlines()[0]} (see the config file for the field's type)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (where outputs, checkpoints and logs go)")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info("job %s, workdir %s", _CONFIG.value.job, _WORKDIR.value)
  try:
    if _CHECK.value:
      print(check(_CONFIG.value, _WORKDIR.value))
    else:
      run_job(_CONFIG.value, _WORKDIR.value)
  except validate.ConfigError as e:  # a bad value: its message is the whole story
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(2)
  except errors.StopError as e:  # a run that cannot go on (disk full, workdir in use, NaN)
    print(f"FATAL: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
