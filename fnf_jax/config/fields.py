"""The vocabulary of config checks: one function per kind of field (an integer in a range, one
of a set, a string; the files and folders a config names are fnf_jax/config/inputs.py). Each
reads `config.<dotted key>` and raises ConfigError with a message that names the key, the value
and what is valid. No jax here.
"""

import math

from fnf_jax.config.errors import ConfigError


def value(config, key: str):
  """config.<key> for a dotted key; ConfigError naming the key when a part is missing."""
  node, walked = config, []
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      where = "config" + "".join(f".{w}" for w in walked)
      have = sorted(node.keys()) if hasattr(node, "keys") else []
      raise ConfigError(f"config.{key} is missing: {where} has no field {part!r} (it has "
                        f"{', '.join(have)}); the config file must set it")
    node, walked = node[part], walked + [part]
  return node


def one_of(config, key: str, valid) -> None:
  v = value(config, key)
  if v not in valid:
    raise ConfigError(f"config.{key} = {v!r} is not one of {tuple(valid)}")


def integer(config, key: str, low: int, high: int | None = None) -> None:
  v = value(config, key)
  if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    raise ConfigError(f"config.{key} = {v!r} is not valid: it must be {valid}")


def number(config, key: str, low: float, high: float = math.inf, *, open_low: bool = False,
           open_high: bool = False) -> None:
  """low <= value <= high (or < where open)."""
  v = value(config, key)
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
  if not ok:
    left, right = "(" if open_low else "[", ")" if open_high or high == math.inf else "]"
    raise ConfigError(f"config.{key} = {v!r} is not valid: it must be a number in "
                      f"{left}{low}, {high}{right}")


def boolean(config, key: str) -> None:
  v = value(config, key)
  if not isinstance(v, bool):
    raise ConfigError(f"config.{key} = {v!r} is not one of (True, False)")


def text(config, key: str, *, nonempty: bool = False) -> None:
  v = value(config, key)
  if not isinstance(v, str) or (nonempty and not v):
    raise ConfigError(f"config.{key} = {v!r} is not valid: it must be a "
                      f"{'non-empty ' if nonempty else ''}string")
