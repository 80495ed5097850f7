"""Packages that extend fnf_jax with jobs and rewards of their own.

The core's tables (each a `fnf_jax.registry.Registry`: jobs, judges, rewards, trainable models,
reward datasets) import these on their first lookup; each package's `__init__` registers what it
brings (`jobs.add`, `registry.add`, ...) and must stay light (no jax), so that a config can be
validated in a second.
This tuple is the only place the core names them.
"""

import importlib

PACKAGES = ("fnf_jax.toy",)
_loaded = False


def load() -> None:
  global _loaded
  if not _loaded:
    _loaded = True  # first: a package's registration may itself read a registry
    for package in PACKAGES:
      importlib.import_module(package)
