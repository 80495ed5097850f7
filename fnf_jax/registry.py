"""One name -> entry table, the shape of every table a config names things from.

The job table (fnf_jax/jobs), the judges (fnf_jax/evaluation/judges.py), the rewards
(fnf_jax/rewards/registry.py), the trainable reward models (fnf_jax/rewards/trainable.py) and the
reward datasets (fnf_jax/data/reward_data.py) are each a `Registry`: an entry is that table's own
record (a dataclass of "module:function" strings and the config fields it reads, or a bare
"module:function"), and `resolve` imports a target only when it is used. The plugins
(`fnf_jax.plugins`, the toy world) add their entries on the first lookup of any table.

Light on purpose: `fnf_jax.config.validate` reads these tables, and a config must be checked
without importing jax, numpy or flax.
"""

import importlib
from typing import Any

from fnf_jax import plugins


class UnknownName(KeyError, ValueError):
  """A name no entry has. A KeyError (a failed lookup) and a ValueError (a bad config value),
  since callers have caught it as either; its text is the message itself, not KeyError's repr."""

  def __str__(self) -> str:
    return str(self.args[0])


class Registry:
  """name -> entry, with the plugins' entries added on the first lookup.

  `kind` names an entry in the messages ("job", "judge"); `key` is the config key that names
  one ("config.job"). An unknown name's message is "KEY = 'NAME' is not one of [...]" with a key,
  else "KIND 'NAME' is not registered; available: [...]" (the texts configs and tests know).
  """

  def __init__(self, kind: str, key: str = "", entries: dict[str, Any] | None = None):
    self.kind = kind
    self.key = key
    self._entries: dict[str, Any] = dict(entries or {})

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {sorted(self._entries)})"

  def add(self, name: str, entry: Any) -> None:
    # No plugin load here: the plugins themselves call add while they load.
    if name in self._entries:
      raise ValueError(f"{self.kind} {name!r} registered twice")
    self._entries[name] = entry

  def entries(self) -> dict[str, Any]:
    """A copy of the table, the plugins' entries included."""
    plugins.load()
    return dict(self._entries)

  def names(self) -> list[str]:
    return sorted(self.entries())

  def __contains__(self, name: str) -> bool:
    return name in self.entries()

  def get(self, name: str) -> Any:
    """The entry `name`; raises UnknownName listing the valid names."""
    entries = self.entries()
    if name not in entries:
      raise UnknownName(self._unknown(name, sorted(entries)))
    return entries[name]

  def _unknown(self, name: str, names: list[str]) -> str:
    if self.key:
      return f"{self.key} = {name!r} is not one of {names}"
    return f"{self.kind} {name!r} is not registered; available: {names}"


def resolve(target: str) -> Any:
  """"module:attr" -> the attribute, importing the module now (and only now)."""
  module, _, attr = target.partition(":")
  if not module or not attr:
    raise ValueError(f"{target!r} is not a 'module:attr' target")
  return getattr(importlib.import_module(module), attr)
