"""Meshes, logical axis rules and shardings derived from `jax.eval_shape`.

Parameters and activations carry logical axis names (`fnf_jax.models.layers`); a config maps
them onto mesh axes. With the default rules a mesh {"data": D, "fsdp": F} shards the batch over
all D·F devices and every large parameter dimension over the F devices of the fsdp axis, so pure
data parallelism (F = 1) and FSDP (D = 1) are one config change apart.
"""

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axis (or axes, or None for replicated). The first matching rule wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("mlp", "fsdp"),
    ("conv_out", "fsdp"),
    ("vocab", "fsdp"),
    ("embed", None),
    ("conv_in", None),
    ("norm", None),
    ("heads", None),
    ("length", None),
)


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


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical names (eval_shape of init).

  Unboxed leaves, and dimensions a mesh axis does not divide, are replicated.
  """
  def one(leaf):
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
    shape = np.shape(nn.meta.unbox(leaf))
    return NamedSharding(mesh, _fit(logical_to_spec(names, rules), shape, mesh))

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of an array whose leading dimension is the global batch."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def put(tree: Any, shardings: Any) -> Any:
  """Places host arrays on the mesh (each process passes the full global arrays)."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)
