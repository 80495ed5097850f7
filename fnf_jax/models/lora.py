"""LoRA on a frozen parameter tree: y = x·W + (alpha / r) · (x·A)·B for the kernels a regex
selects.

The trainable tree mirrors the base tree but holds only the targeted layers, each as
{"lora_a": [in, r], "lora_b": [r, out]} (float32). B starts at zero, so step 0 reproduces the
base model exactly. The model applies it beside the frozen kernel: `collection` turns it into
the "lora" variable collection that `fnf_jax.models.layers.Dense` reads
(`module.apply({"params": base, "lora": collection(lora, scale)}, ...)`), so the update is never
rounded into a bfloat16 kernel. `merge` (W + s·A·B in the kernel) is for exports and checks.

Files: `fnf_jax.runtime.checkpoint.export_lora_safetensors` writes a tree in diffusers' / peft's keys;
`fnf_jax.models.lora_io` reads those, diffusers' / peft's own and a run's workdir back.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

# diffusers' attention projections (self- and cross-attention): the paper's and peft's default.
DEFAULT_TARGETS = r"attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$"


def targets(base_params: Any, pattern: str = DEFAULT_TARGETS) -> list[tuple[str, ...]]:
  """Paths (tuples) of the 2-D kernels whose '/'-joined path matches `pattern`."""
  regex = re.compile(pattern)
  flat = traverse_util.flatten_dict(base_params)
  found = [p for p in flat if regex.search("/".join(p))]
  bad = [("/".join(p), jnp.shape(flat[p])) for p in found if len(jnp.shape(flat[p])) != 2]
  if bad:
    raise ValueError(f"LoRA targets must be dense kernels [in, out]; {pattern!r} also matches "
                     f"{bad[:3]}. Narrow the pattern.")
  if not found:
    some = ["/".join(p) for p in list(flat)[:5]]
    raise ValueError(f"LoRA target pattern {pattern!r} matches no parameter; paths look like {some}")
  return sorted(found)


def init(rng: jax.Array, base_params: Any, *, rank: int, pattern: str = DEFAULT_TARGETS) -> dict:
  """LoRA params for every targeted kernel: A ~ N(0, 1/in) (Kaiming-like, as peft), B = 0."""
  flat = traverse_util.flatten_dict(base_params)
  paths = targets(base_params, pattern)
  out = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    d_in, d_out = jnp.shape(flat[path])
    out[path[:-1] + ("lora_a",)] = jax.random.normal(key, (d_in, rank), jnp.float32) / jnp.sqrt(d_in)
    out[path[:-1] + ("lora_b",)] = jnp.zeros((rank, d_out), jnp.float32)
  return traverse_util.unflatten_dict(out)


def merge(base_params: Any, lora_params: dict, *, scale: float) -> Any:
  """Base tree with W + scale · A @ B at each LoRA'd kernel (in the base kernel's dtype)."""
  flat = traverse_util.flatten_dict(base_params)
  lora = traverse_util.flatten_dict(lora_params)
  merged = dict(flat)
  for path in lora:
    if path[-1] != "lora_a":
      continue
    layer = path[:-1]
    kernel = flat[layer + ("kernel",)]
    delta = lora[path] @ lora[layer + ("lora_b",)]
    merged[layer + ("kernel",)] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(merged)


def collection(lora_params: dict, scale: float) -> dict:
  """The "lora" variable collection of `lora_params`: the same tree with alpha / r folded into B
  (so the Dense layers need no scale of their own)."""
  flat = traverse_util.flatten_dict(lora_params)
  return traverse_util.unflatten_dict(
      {path: value * scale if path[-1] == "lora_b" else value for path, value in flat.items()})


def scale(rank: int, alpha: float) -> float:
  return alpha / rank

