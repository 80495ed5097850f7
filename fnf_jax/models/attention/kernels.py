"""The attention kernels, each run at the shapes its `Choice` names (see `choice.py`).

All take and return [B, T, heads, head_dim] (queries) / [B, S, heads, head_dim] (keys, values)
and `scale` multiplies q·k. The fused kernels pad what their rules need and slice it off again,
so every kernel computes the same attention as `xla` up to rounding.

Off their hardware the fused kernels still run, for tests and dry runs: splash through Pallas'
interpreter (`interpret=True`: the kernel's own grid, blocks and masking, run as XLA ops; jax
0.10's TPU-specific interpreter, `pltpu.InterpretParams`, fails on splash's backward grid),
cudnn's padding and masking through XLA's implementation of the same
`jax.nn.dot_product_attention` call (`fused=False`), since cuDNN itself needs the GPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fnf_jax.models.attention.choice import Choice


def xla(q, k, v, *, scale: float, is_causal: bool = False, mask=None, bias=None):
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      is_causal=is_causal, implementation="xla")


def chunked(q, k, v, *, scale: float, chunk: int, remat: bool):
  """XLA over `chunk` query rows at a time (the last rows padded up to a whole chunk); with
  `remat`, each chunk's backward recomputes its [chunk, S] logits instead of keeping them."""
  b, t = q.shape[:2]
  padded = _pad(q, 1, -(-t // chunk) * chunk)
  pieces = jnp.moveaxis(padded.reshape(b, -1, chunk, *q.shape[2:]), 1, 0)
  one = lambda qc: xla(qc, k, v, scale=scale)
  out = jax.lax.map(jax.checkpoint(one) if remat else one, pieces)
  return jnp.moveaxis(out, 0, 1).reshape(b, -1, *v.shape[2:])[:, :t]


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def cudnn(q, k, v, *, scale: float, is_causal: bool, q_len: int, kv_len: int,
          fused: bool = True):
  """cuDNN's fused attention with queries / keys padded to `q_len` / `kv_len`: the padded keys
  are masked out by their true length, the padded query rows dropped."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  lengths = jnp.full((b,), s, jnp.int32) if kv_len > s else None
  out = jax.nn.dot_product_attention(
      _pad(q, 1, q_len), _pad(k, 1, kv_len), _pad(v, 1, kv_len), scale=scale,
      is_causal=is_causal, key_value_seq_lengths=lengths,
      implementation="cudnn" if fused else "xla")
  return out[:, :t]


def splash(q, k, v, *, scale: float, choice: Choice, interpret: bool = False):
  """The Pallas splash kernel, per example and head, at the Choice's padded shapes; under a
  mesh whose rules shard the batch, one kernel per device on its rows (shard_map: GSPMD cannot
  split a Pallas call, it would gather the batch onto every device)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk, splash_attention_mask as sm)

  b, t, heads, d = q.shape
  s = k.shape[1]
  block = choice.block
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.FullMask((choice.q_len, choice.kv_len))] * heads)
  kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  # Padded keys sit in segment 1, which no query (all segment 0) attends to.
  segments = sk.SegmentIds(q=jnp.zeros((choice.q_len,), jnp.int32),
                           kv=(jnp.arange(choice.kv_len) >= s).astype(jnp.int32))

  def local(q, k, v):
    layout = lambda x, n: _pad(_pad(jnp.swapaxes(x, 1, 2), 2, n), 3, choice.head_dim)
    # The scale goes on q: the kernel applies none.
    qp = layout((q.astype(jnp.float32) * scale).astype(q.dtype), choice.q_len)
    out = jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=segments))(
        qp, layout(k, choice.kv_len), layout(v, choice.kv_len))
    return jnp.swapaxes(out[:, :, :t, :d], 1, 2)

  split = _batch_split(b)
  if split is None:
    return local(q, k, v)
  mesh, spec = split
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q, k, v)


def _active_mesh():
  """The mesh of `jax.set_mesh`, or of the `with mesh:` context the jobs use (flax's logical
  constraints resolve against the same one; jax keeps it in its thread resources)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh
  try:
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    return mesh_lib.thread_resources.env.physical_mesh
  except (ImportError, AttributeError):  # a jax without the legacy context: none is active
    return mesh


def _batch_split(batch: int):
  """(mesh, PartitionSpec) that splits the batch over the active mesh as the logical "batch"
  rule says; None without a mesh or rule, or when the batch does not divide."""
  mesh = _active_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  axes = nn.logical_to_mesh_axes(("batch",))[0]
  if axes is None:
    return None
  names = axes if isinstance(axes, tuple) else (axes,)
  size = int(np.prod([mesh.shape[a] for a in names]))
  return (mesh, P(axes)) if batch % size == 0 else None


def run(choice: Choice, q, k, v, *, scale: float, is_causal: bool = False, mask=None,
        bias=None, on_hardware: bool = True):
  """`choice`'s kernel on (q, k, v); `on_hardware=False` runs a fused kernel off its hardware
  (the Pallas interpreter, or XLA for cuDNN), for tests and dry runs."""
  if choice.kernel == "xla":
    return xla(q, k, v, scale=scale, is_causal=is_causal, mask=mask, bias=bias)
  assert mask is None and bias is None, choice  # choose() keeps those on xla
  if choice.kernel == "chunked":
    return chunked(q, k, v, scale=scale, chunk=choice.chunk, remat=choice.remat)
  if choice.kernel == "cudnn":
    return cudnn(q, k, v, scale=scale, is_causal=is_causal, q_len=choice.q_len,
                 kv_len=choice.kv_len, fused=on_hardware)
  return splash(q, k, v, scale=scale, choice=choice, interpret=not on_hardware)
