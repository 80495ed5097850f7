"""The demo's methods as configs: Focus-N-Fix is configs/toy.py itself, DRaFT is it with the
`draft` overrides applied (M ≡ 1, β = γ = 0). Light (no jax): config checks use it too."""

import copy

from fnf_jax.config import sweep

METHODS = ("base", "draft", "fnf")


def method_config(config, method: str):
  """The training config of "fnf" (the config itself) or "draft" (with config.draft applied;
  one run, also when the config sweeps Focus-N-Fix's objective: configs/toy.py:sweep)."""
  cfg = copy.deepcopy(config)
  if method == "draft":
    _override(cfg, config.draft, "draft")
    if sweep.settings(cfg):
      cfg = sweep.member_config(cfg, {})
  elif method != "fnf":
    raise ValueError(f"method {method!r} is not one of ('fnf', 'draft')")
  return cfg


def _override(node, overrides, where: str) -> None:
  for key, value in overrides.items():
    if key not in node:
      raise KeyError(f"config.{where}.{key} overrides nothing: the config has no {key!r}")
    if hasattr(value, "items"):
      _override(node[key], value, f"{where}.{key}")
    else:
      node[key] = value
