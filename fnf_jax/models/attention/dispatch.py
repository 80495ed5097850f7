"""`attention(q, k, v)`: every attention layer of every model family calls this.

It describes the call (`choice.Layer`), asks `choice.choose` which kernel serves it on this
backend, once as a plain forward and once under `grad`, and runs that. When the two answers
differ (chunks rematerialised only for a backward; cuDNN's even-length padding only for its
backward), a `jax.custom_vjp` runs the forward answer when nothing differentiates the call and
the gradient answer when something does: JAX itself tells the two apart, through `scan`,
`checkpoint` and `vmap`, so no caller has to say which it is.

A named kernel that cannot take a layer falls back (choice.py's rules) and says so once in the
log; `auto` logs each distinct layer's kernel once at INFO.

For tests and dry runs, `simulate(backend)` makes the calls inside it choose for another
backend, and runs the fused kernels off their hardware (kernels.py), and `record()` collects
the Layer of every call traced inside it (e.g. under `jax.eval_shape`).
"""

import contextlib
import contextvars
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
from absl import logging

from fnf_jax.models.attention import kernels
from fnf_jax.models.attention.choice import Backend, Choice, Layer, choose

_SIMULATED: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "fnf_attention_simulated", default=None)
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "fnf_attention_recording", default=None)
_LOGGED: set = set()


@functools.lru_cache(maxsize=None)
def hardware_backend() -> Backend:
  """This process's default backend, as `choose` reads it."""
  platform = jax.default_backend()
  if platform != "gpu":
    return Backend(platform)
  device = jax.devices()[0]
  cuda = "cuda" in str(getattr(device.client, "platform_version", "")).lower()
  capability = getattr(device, "compute_capability", None)
  cap = tuple(int(x) for x in str(capability).split(".")[:2]) if capability else None
  return Backend("gpu", cuda=cuda, capability=cap)


def current_backend() -> Backend:
  return _SIMULATED.get() or hardware_backend()


@contextlib.contextmanager
def simulate(backend: Backend) -> Iterator[None]:
  """Attention traced inside chooses as on `backend`, running fused kernels off hardware (the
  Pallas TPU interpreter; cuDNN's padding through XLA). For tests and dry runs only."""
  token = _SIMULATED.set(backend)
  try:
    yield
  finally:
    _SIMULATED.reset(token)


@contextlib.contextmanager
def record() -> Iterator[list[Layer]]:
  """Collects the Layer of every attention call traced inside (in call order)."""
  layers: list[Layer] = []
  token = _RECORDING.set(layers)
  try:
    yield layers
  finally:
    _RECORDING.reset(token)


def layer_of(q, k, *, is_causal: bool = False, mask=None, bias=None) -> Layer:
  b, t, heads, d = q.shape
  return Layer(batch=b, q_len=t, kv_len=k.shape[1], heads=heads, head_dim=d,
               dtype=jnp.dtype(q.dtype).name, causal=is_causal, bias=bias is not None,
               mask=mask is not None)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto",
              upcast: bool = False, is_causal: bool = False, mask: jax.Array | None = None,
              bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """Scaled dot-product attention on [B, T, heads, head_dim] (keys and values [B, S, ...]).

  implementation: "auto" or a kernel of choice.KERNELS (config `model.attention`).
  upcast: compute in float32, as diffusers' `upcast_attention` (SD 2.1).
  mask: boolean, True where a query may attend ([B | 1, heads | 1, T, S]); bias: added to the
  logits; scale: of q·k (default 1/sqrt(head_dim); T5 uses 1).
  Returns [B, T, heads, head_dim] in q's dtype.
  """
  dtype = q.dtype
  if upcast:
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  layer = layer_of(q, k, is_causal=is_causal, mask=mask, bias=bias)
  backend = current_backend()
  forward = choose(layer, backend, implementation, differentiated=False)
  backward = choose(layer, backend, implementation, differentiated=True)
  recording = _RECORDING.get()
  if recording is not None:
    recording.append(layer)
  _log_once(layer, implementation, forward, backward)
  run = lambda c: functools.partial(
      kernels.run, c, scale=1 / math.sqrt(layer.head_dim) if scale is None else scale,
      is_causal=is_causal, on_hardware=_SIMULATED.get() is None)
  if forward == backward:
    out = run(forward)(q, k, v, mask=mask, bias=bias)
  else:
    # choose() keeps a bias or mask on xla both ways, so only (q, k, v) flow here.
    out = _forward_or_grad(run(forward), run(backward))(q, k, v)
  return out.astype(dtype)


def _forward_or_grad(forward, backward):
  """`forward` where nothing differentiates the call; `backward` and its VJP where something
  does."""

  @jax.custom_vjp
  def f(q, k, v):
    return forward(q, k, v)

  def fwd(q, k, v):
    return jax.vjp(backward, q, k, v)  # (output, the VJP closure as the residual)

  f.defvjp(fwd, lambda vjp, g: vjp(g))
  return f


def _log_once(layer: Layer, requested: str, forward: Choice, backward: Choice) -> None:
  key = (requested, layer, forward, backward)
  if key in _LOGGED:
    return
  _LOGGED.add(key)
  ways = (forward.describe() if forward == backward else
          f"{forward.describe()}; under grad {backward.describe()}")
  if requested not in ("auto", forward.kernel) and forward.reason:
    logging.warning("attention %s: %s cannot serve it (%s): %s instead", layer.describe(),
                    requested, forward.reason, ways)
  else:
    logging.info("attention %s: %s", layer.describe(), ways)

