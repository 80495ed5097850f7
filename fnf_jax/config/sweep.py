"""config.sweep, read and checked (no jax here): the settings a sweep trains side by side, their
names, and the config of a separate run of one of them. The step that trains them is
fnf_jax/fnf/sweep.py.
"""

import copy
import itertools
import math

from fnf_jax.config.errors import ConfigError
from fnf_jax.config.fields import number, one_of, value

# The objective fields a sweep may vary: runtime inputs of the step (fnf.objective.Objective).
FIELDS = ("beta", "gamma", "reward_weight")
COMBINE = ("product", "zip")
# The mesh axis that shards the members (config.mesh); the batch is split over the others.
MESH_AXIS = "sweep"


def settings(config) -> list[dict]:
  """The sweep's settings, in order: [{field: value}] over the swept fields; [] when
  config.sweep names no values (a single run)."""
  sw = config.get("sweep")
  if sw is None:
    return []
  swept = [(f, tuple(float(v) for v in sw[f])) for f in FIELDS if len(sw[f])]
  if not swept:
    return []
  names, values = [f for f, _ in swept], [v for _, v in swept]
  rows = itertools.product(*values) if sw.combine == "product" else zip(*values)
  return [dict(zip(names, row)) for row in rows]


def label(setting: dict) -> str:
  """A member's name, its values: "beta=0.1_gamma=0" (a file name on every system)."""
  return "_".join(f"{k}={v:g}" for k, v in setting.items())


def labels(config) -> tuple[str, ...]:
  return tuple(label(s) for s in settings(config))


def member_config(config, setting: dict):
  """The config of a separate run of one member: the objective with its values, no sweep."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for k, v in setting.items():
      c.objective[k] = v
    for f in FIELDS:
      c.sweep[f] = ()
  return c


def batch_devices(mesh_sizes: dict) -> int:
  """The devices one batch is split over: the mesh's, less the sweep axis (each member's
  devices see the whole batch). -1 axes count as 1 (not known before the devices are)."""
  return math.prod(s for a, s in mesh_sizes.items() if a != MESH_AXIS and s != -1)


def check(config) -> None:
  """config.sweep's values, ranges and mesh axis (validate.training)."""
  if config.get("sweep") is None:
    return
  one_of(config, "sweep.combine", COMBINE)
  lengths = {}
  for f in FIELDS:
    values = value(config, f"sweep.{f}")
    if not isinstance(values, (tuple, list)):
      raise ConfigError(f"config.sweep.{f} = {values!r} is not valid: it must be a tuple of "
                        f"numbers (() = not swept)")
    for i, v in enumerate(values):
      probe = {"sweep": {f: v}}
      open_low = f == "reward_weight"  # as objective.reward_weight: > 0; β, γ >= 0
      try:
        number(probe, f"sweep.{f}", 0.0, open_low=open_low)
      except ConfigError as e:
        raise ConfigError(str(e).replace(f"config.sweep.{f} =", f"config.sweep.{f}[{i}] =")) \
            from None
    if len(set(values)) != len(values):
      raise ConfigError(f"config.sweep.{f} = {tuple(values)} names a value twice: each member "
                        "needs its own setting")
    if values:
      lengths[f] = len(values)
  if value(config, "sweep.combine") == "zip" and len(set(lengths.values())) > 1:
    raise ConfigError(f"config.sweep.combine = 'zip' pairs the i-th values, but the swept "
                      f"fields have different lengths {lengths}: give them equal lengths or use "
                      "'product'")
  sizes = dict(value(config, "mesh"))
  if MESH_AXIS in sizes:
    n, axis = len(settings(config)), sizes[MESH_AXIS]
    if not n:
      raise ConfigError(f"config.mesh has a {MESH_AXIS!r} axis but config.sweep names no "
                        "values: remove the axis or set config.sweep")
    if axis == -1 or n % axis:
      raise ConfigError(f"config.mesh['{MESH_AXIS}'] = {axis}: it must be a fixed size that "
                        f"divides the sweep's {n} members (each device group trains whole "
                        "members)")
