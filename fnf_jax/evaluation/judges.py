"""Analytic judges: host-side functions that say, per image, whether it is a problem, and
whatever else they measure. The eval job's `eval.judge` names one, or a reward (an image is a
problem when the reward scores it below `eval.judge_threshold`).

A judge is not differentiable and never trains anything: it exists where the ground truth is
known (the toy world's rules, fnf_jax/toy/judge.py), so that an evaluation is not blurred by a
learned model's own errors. Packages register theirs with `add` (names only: validating a
config imports nothing heavy, not even numpy) into `JUDGES`, a `fnf_jax.registry.Registry`.
"""

import dataclasses
from typing import Any, Callable, Sequence

from fnf_jax.registry import Registry, resolve


@dataclasses.dataclass(frozen=True)
class Judge:
  # (images [N, H, W, 3] numpy in [0, 1], prompts [N]) -> {name: [N] numbers or bools}
  evaluate: Callable[[Any, Sequence[str]], dict]
  problem: str  # the key of evaluate's output that is True where the image is a problem
  description: str  # one sentence for the report: what it is and what it calls a problem
  # Its other measures that are better low; the rest count as better high (the Pareto front).
  lower_is_better: tuple = ()


# name -> the "module:function" that returns its Judge (the core has none: plugins add theirs).
JUDGES = Registry("judge")
names = JUDGES.names


def add(name: str, builder: str) -> None:
  """Registers judge `name`: `builder` ("module:function") returns its Judge."""
  JUDGES.add(name, builder)


def build(name: str) -> Judge:
  """The judge `name`; raises UnknownName (a ValueError) listing the registered ones."""
  return resolve(JUDGES.get(name))()
