"""What a run would do, said before it does it: `python -m fnf_jax.main ... --check`.

After the config check (every input present) and the preflight (the mesh over the devices
found), `describe` lists the files the run would read, the mesh, the weights' memory per device
and the compilation cache's folder. Nothing is loaded and nothing compiled: the weights' sizes
come from the safetensors headers (a few KiB each), so a pod launch is checked in seconds.
"""

import json
import math
import os
import struct

from fnf_jax.config import sweep
from fnf_jax.runtime import compilation

GIB = 1024**3
# Bytes per element of the safetensors dtypes that hold floating-point weights.
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# The one measured figure for the step's own memory (BENCHMARKS.md, 2026-12-02: the SD1.5 step
# at 512², K = 2, the configs' memory settings; arguments + temporaries of an XLA compile).
SD15_STEP_GIB_PER_IMAGE = (10.1, "SD1.5 at 512², K = 2: 10.1 GiB of arguments and temporaries "
                           "at one image per device, 23.8 at four (benchmarks/memory.py)")


def safetensors_elements(path: str) -> dict[str, int]:
  """dtype -> number of elements in the safetensors file `path`, from its header only."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  counts: dict[str, int] = {}
  for name, entry in header.items():
    if name != "__metadata__":
      counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + math.prod(entry["shape"])
  return counts


def weights_bytes(path: str, dtype: str) -> int:
  """Bytes of every safetensors file at `path` (a file or a folder, recursively) once loaded in
  `dtype` (floating-point tensors are cast; others keep their width)."""
  files = [path] if os.path.isfile(path) else [
      os.path.join(root, n) for root, _, names in os.walk(path) for n in names
      if n.endswith(".safetensors")]
  total = 0
  for file in files:
    for kind, n in safetensors_elements(file).items():
      total += n * (_DTYPE_BYTES[dtype] if kind in _FLOAT_BYTES else 1)
  return total


def _size(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


def _memory(config, mesh_shape: dict) -> list[str]:
  model = config.get("model", {})
  path, dtype = model.get("path", ""), model.get("dtype", "float32")
  if not path or not os.path.isdir(path) or dtype not in _DTYPE_BYTES:
    return []
  total = weights_bytes(path, dtype)
  # The default sharding rules split every large parameter over the fsdp axis (sharding.py).
  fsdp = mesh_shape.get("fsdp", 1)
  lines = [f"  diffusion weights: {_size(total)} in {dtype}, {_size(total / fsdp)} per device "
           f"(fsdp = {fsdp})"]
  images = config.get("data", {}).get("batch_size", 0)
  devices = sweep.batch_devices(mesh_shape)  # a sweep's members each see the whole batch
  members = len(sweep.settings(config))
  if members:
    groups = mesh_shape.get(sweep.MESH_AXIS, 1)
    lines.append(f"  sweep: {members} members ({', '.join(sweep.labels(config))}), "
                 f"{members // groups} per device (mesh axis {sweep.MESH_AXIS!r} = {groups})")
  if images:
    per_device = images * max(members, 1) / math.prod(mesh_shape.values())
    each = f", for each of {members} members" if members else ""
    lines.append(f"  images per device: {per_device:g} (data.batch_size = {images} over "
                 f"{devices} devices{each})")
  lines.append("  the step's activations are not estimated without compiling; measured: "
               f"{SD15_STEP_GIB_PER_IMAGE[1]}")
  return lines


def describe(config, workdir: str, inputs, mesh_shape: dict | None) -> str:
  """The --check report: inputs (fnf_jax.config.fields.Input), mesh, memory, cache folder."""
  lines = [f"check passed: job {config.job!r}, workdir {workdir}", "would read:"]
  lines += [f"  {i.key} = {i.path}" for i in inputs] or ["  (no files: everything is built in)"]
  if mesh_shape is not None:
    lines.append(f"mesh: {mesh_shape} ({math.prod(mesh_shape.values())} devices)")
    lines += _memory(config, mesh_shape)
  if "compile" in config:
    folder = compilation.cache_folder(config.compile, workdir)
    lines.append(f"compilation cache: {folder or 'off'}")
  return "\n".join(lines)
