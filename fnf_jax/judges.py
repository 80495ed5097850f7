"""Analytic judges: host-side functions that say, per image, whether it is a problem, and
whatever else they measure. The eval job's `eval.judge` names one, or a reward (an image is a
problem when the reward scores it below `eval.judge_threshold`).

A judge is not differentiable and never trains anything: it exists where the ground truth is
known (the toy world's rules, fnf_jax/toy/judge.py), so that an evaluation is not blurred by a
learned model's own errors. Packages register theirs with `add` (names only: validating a
config imports nothing heavy, not even numpy).
"""

import dataclasses
import importlib
from typing import Callable, Sequence

from fnf_jax import plugins


@dataclasses.dataclass(frozen=True)
class Judge:
  # (images [N, H, W, 3] numpy in [0, 1], prompts [N]) -> {name: [N] numbers or bools}
  evaluate: Callable[["np.ndarray", Sequence[str]], dict]  # noqa: F821
  problem: str  # the key of evaluate's output that is True where the image is a problem
  description: str  # one sentence for the report: what it is and what it calls a problem


_ENTRIES: dict[str, str] = {}


def add(name: str, builder: str) -> None:
  """Registers judge `name`: `builder` ("module:function") returns its Judge."""
  if name in _ENTRIES:
    raise ValueError(f"judge {name!r} registered twice")
  _ENTRIES[name] = builder


def names() -> list[str]:
  plugins.load()
  return sorted(_ENTRIES)


def build(name: str) -> Judge:
  if name not in names():
    raise ValueError(f"judge {name!r} is not registered; available: {names()}")
  module, function = _ENTRIES[name].split(":")
  return getattr(importlib.import_module(module), function)()
