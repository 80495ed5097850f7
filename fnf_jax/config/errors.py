"""Errors whose message states the whole story (what, where, what to do): `python -m
fnf_jax.main` prints them as one FATAL line without a traceback, and exits 2 for a bad config
(ConfigError), 1 for a run that cannot go on (StopError). No jax here: main imports this before
anything heavy."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key, the value and what is valid."""


class StopError(RuntimeError):
  """The run cannot go on; the message says why and what to do."""
