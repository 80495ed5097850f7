"""Meshes, logical axis rules and shardings derived from `jax.eval_shape`.

Parameters and activations carry logical axis names (`fnf_jax.models.layers`); a config maps
them onto mesh axes. With the default rules a mesh {"data": D, "fsdp": F} shards the batch over
all D·F devices and every large parameter dimension over the F devices of the fsdp axis, so pure
data parallelism (F = 1) and FSDP (D = 1) are one config change apart.

`logical_to_spec` is the one translation from logical names to a PartitionSpec, for parameters
and batch arrays alike (activations inside the modules go through flax's
`nn.with_logical_constraint` under the same rules). A large parameter that no mesh axis can
split is replicated on every device; `logical_shardings` says so in a warning.
"""

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fnf_jax.config import choices
from fnf_jax.config import sweep

# logical axis -> mesh axis (or axes, or None for replicated): the configs' default, defined
# with the other config choices (no jax there).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = choices.SHARDING_RULES


def rules(config_rules) -> tuple[tuple[str, Any], ...]:
  """config.sharding_rules (lists where a config file or JSON gave them) as the tuples flax's
  `nn.logical_axis_rules` takes."""
  return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config_rules)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the named axes, in order; one size may be -1 (all remaining devices).

  Without a -1, a mesh smaller than the device count takes the first devices (a warning says
  so): that is how a test runs the same loop on 1 of 8 fake devices.
  Axes are `Auto`, which `nn.with_logical_constraint` needs (jax.make_mesh defaults to Explicit).
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = list(axes.keys()), list(axes.values())
  if -1 not in sizes and math.prod(sizes) < len(devices):
    logging.warning("mesh %s uses %d of %d devices", dict(axes), math.prod(sizes), len(devices))
    devices = devices[:math.prod(sizes)]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(axes)} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, {len(devices)} present")
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those stay replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def logical_to_spec(names: Sequence[str | None] | None, rules) -> P:
  """Logical axis names -> PartitionSpec; each mesh axis is used at most once per array.

  Unlike flax's version this accepts a name twice (a square [embed, embed] kernel): the second
  occurrence stays replicated.
  """
  if names is None:
    return P()
  table = dict(rules)
  used, out = set(), []
  for name in names:
    axes = table.get(name) if name is not None else None
    flat = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    if not flat or used & set(flat):
      out.append(None)
      continue
    used.update(flat)
    out.append(axes)
  return P(*out)


# Parameters with more elements than this that stay replicated on a mesh of several devices are
# named in a warning (1 Mi elements: 4 MiB in float32; SD1.5's largest kernels have 13 Mi).
REPLICATED_WARNING_SIZE = 2**20


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical names (eval_shape of init).

  Unboxed leaves, and dimensions a mesh axis does not divide, are replicated; a leaf above
  REPLICATED_WARNING_SIZE elements that ends up replicated while the rules shard parameters over
  a mesh axis of size > 1 is named in a warning (every device then holds all of it).
  """
  unsplit = []
  # Mesh axes of size > 1 that the rules use for parameters: with none (pure data parallelism)
  # every parameter is replicated by design.
  param_axes = {a for name, axes in rules if name != "batch" and axes is not None
                for a in (axes if isinstance(axes, tuple) else (axes,)) if mesh.shape[a] > 1}

  def one(path, leaf):
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
    shape = np.shape(nn.meta.unbox(leaf))
    spec = _fit(logical_to_spec(names, rules), shape, mesh)
    if param_axes and math.prod(shape) > REPLICATED_WARNING_SIZE and not any(spec):
      unsplit.append((jax.tree_util.keystr(path), shape, names))
    return NamedSharding(mesh, spec)

  out = jax.tree_util.tree_map_with_path(
      one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, shape, names in unsplit:
    logging.warning("parameter %s %s (logical axes %s) is replicated on all %d devices of mesh "
                    "%s: no rule maps its axes to a mesh axis that divides them", path, shape,
                    names, mesh.size, dict(mesh.shape))
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES, axis: int = 0) -> NamedSharding:
  """Sharding of an array whose dimension `axis` is the global batch."""
  names = [None] * ndim
  names[axis] = "batch"
  return NamedSharding(mesh, logical_to_spec(names, rules))


def stacked(mesh: Mesh, inner: NamedSharding | None = None) -> NamedSharding:
  """The sharding of a sweep's stacked arrays [N, ...]: the members over the mesh axis "sweep"
  where the mesh has one (else every device holds all of them); `inner`: one member's sharding
  of the rest (None: replicated)."""
  axis = sweep.MESH_AXIS if sweep.MESH_AXIS in mesh.shape else None
  return NamedSharding(mesh, P(axis, *(() if inner is None else tuple(inner.spec))))


def put(tree: Any, shardings: Any) -> Any:
  """Places host arrays on the mesh (each process passes the full global arrays)."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)
