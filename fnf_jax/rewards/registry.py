"""The reward interface and the registry that lets configs name rewards.

A reward is two pure, jittable functions of (params, images, prompt_ids):
    score(params, images [B, H, W, 3] in [0, 1], prompt_ids) -> [B]     (higher is better)
    heatmap(params, images, prompt_ids) -> [B, H', W']  (>= 0, where the image is problematic)
plus its frozen params, which the training step receives as an argument (never closed over).
"""

import dataclasses
import importlib
from typing import Any, Callable

import jax

ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Reward:
  name: str
  score: ScoreFn
  heatmap: ScoreFn
  params: Any = None


_BUILDERS: dict[str, Callable[..., Reward]] = {}
# Modules that register rewards on import; imported on first lookup so configs need no imports.
_MODULES = ("fnf_jax.rewards.color", "fnf_jax.rewards.q16", "fnf_jax.rewards.laion",
            "fnf_jax.rewards.clip_score", "fnf_jax.rewards.zero_shot",
            "fnf_jax.rewards.toy_defect")


def register(name: str):
  def wrap(builder):
    if name in _BUILDERS:
      raise ValueError(f"reward {name!r} registered twice")
    _BUILDERS[name] = builder
    return builder

  return wrap


def names() -> list[str]:
  for module in _MODULES:
    importlib.import_module(module)
  return sorted(_BUILDERS)


def build(cfg) -> Reward:
  """The reward named by cfg.name, built from the rest of the config block."""
  available = names()
  if cfg.name not in available:
    raise ValueError(f"reward {cfg.name!r} is not registered; available: {available}")
  return _BUILDERS[cfg.name](cfg)
