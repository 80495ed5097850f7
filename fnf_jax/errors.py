"""Errors that stop a run for a reason their message states whole (what, where, what to do):
`python -m fnf_jax.main` prints them as one FATAL line and exits 1, without a traceback.
No jax here: main imports this before anything heavy."""


class StopError(RuntimeError):
  """The run cannot go on; the message says why and what to do."""
