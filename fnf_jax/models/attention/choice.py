"""Which kernel serves one attention call: a pure function of the call's shapes, its dtype, the
backend and whether the call is differentiated. No jax here: tests and logs ask it directly.

    choose(layer, backend, requested, differentiated) -> Choice

Kernels:
  xla      jax.nn.dot_product_attention's XLA implementation: the [T, S] logits whole.
  chunked  XLA over at most CHUNK query rows at a time (`lax.map`), so the [T, S] logits of
           long sequences never exist whole; under `grad` each chunk is rematerialised, so the
           backward keeps only the chunk inputs. Same numbers as xla up to rounding.
  cudnn    cuDNN's fused flash attention (NVIDIA GPUs, JAX's `implementation="cudnn"`).
  splash   the Pallas splash-attention kernel for TPUs (jax.experimental.pallas.ops.tpu).

`requested` is the config's `model.attention`: one of the kernels, or "auto". "auto" takes the
backend's fused kernel where it can serve (cudnn on NVIDIA GPUs, splash on TPUs) and chunked /
xla elsewhere. A named kernel that cannot serve a layer (cudnn on a 512-wide head, splash on a
CPU) falls back to what auto would take without it; `Choice.reason` says why.

The rules, from JAX's own checks (jax/_src/cudnn/fused_attention_stablehlo.py) and the Pallas
kernels' block constraints:
- cudnn: a CUDA GPU of compute capability >= 8.0; bfloat16 or float16 (after an `upcast`, the
  compute dtype is float32: XLA); head dim a multiple of 8 and <= 256 on Hopper (9.0) and later,
  <= 128 before; no additive bias or free-form mask (causal is fine). Under `grad`, JAX hands
  cuDNN's backward an (empty) bias, with which cuDNN takes only even lengths: odd query / key
  lengths are padded up to a multiple of 8 (CLIP's 77 tokens -> 80), the padded keys masked
  out with `key_value_seq_lengths` and the padded query rows dropped: exact.
- splash: a TPU; no bias or free-form mask, not causal; head dim padded with zeros to a multiple
  of 128 (the lane width: q·k and the kept columns of p·v are unchanged), query and key lengths
  padded to a multiple of the block (128, or 512 where both divide), the padded keys masked out
  by segment ids. Where padding would more than double the work (the 8x8 mid-block's 64 tokens,
  CLIP text's 77 against 77) the layer stays on XLA, which is faster there.
- chunked: queries longer than CHUNK, and no bias, mask or causality; otherwise one xla
  piece. The queries are split into ceil(T / CHUNK) equal chunks, the last rows padded when
  they do not divide (SD2.1's 48² = 2304 tokens: 5 chunks of 461, one padded row).
"""

import dataclasses

KERNELS = ("xla", "chunked", "cudnn", "splash")
REQUESTS = ("auto",) + KERNELS
# Query rows per chunk of the chunked kernel: SD1.5's 64² latents (4096 tokens) in 8 pieces.
CHUNK = 512
# The Pallas TPU kernels' lane width and the splash block sizes tried (largest first).
LANES = 128
SPLASH_BLOCKS = (512, 128)
# Padding a layer to the splash kernel's blocks may cost at most this factor in work.
SPLASH_MAX_PADDING = 2.0
HALF = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Layer:
  """The static facts of one attention call ([B, T, heads, head_dim] queries, S keys)."""
  batch: int
  q_len: int
  kv_len: int
  heads: int
  head_dim: int
  dtype: str  # the compute dtype (after an upcast), e.g. "bfloat16"
  causal: bool = False
  bias: bool = False  # an additive bias (T5's relative positions)
  mask: bool = False  # a free-form boolean mask

  def describe(self) -> str:
    extra = "".join(f", {n}" for n in ("causal", "bias", "mask") if getattr(self, n))
    return (f"[{self.batch}, {self.q_len}x{self.kv_len}, {self.heads} heads of "
            f"{self.head_dim}, {self.dtype}{extra}]")


@dataclasses.dataclass(frozen=True)
class Backend:
  """Where the call runs: platform "cpu" | "gpu" | "tpu"; for GPUs whether CUDA is the vendor
  and the compute capability (major, minor)."""
  platform: str
  cuda: bool = False
  capability: tuple[int, int] | None = None

  @property
  def hopper(self) -> bool:
    return self.capability is not None and self.capability >= (9, 0)


# Backends the tests and the docs name.
CPU = Backend("cpu")
TPU = Backend("tpu")
H100 = Backend("gpu", cuda=True, capability=(9, 0))  # also the H200
A100 = Backend("gpu", cuda=True, capability=(8, 0))


@dataclasses.dataclass(frozen=True)
class Choice:
  """The kernel and the shapes it runs at (padded lengths / head dim; equal when unpadded)."""
  kernel: str
  q_len: int
  kv_len: int
  head_dim: int
  remat: bool = False  # chunked: each chunk rematerialised in the backward
  chunk: int = 0  # chunked: query rows per chunk (q_len, padded, is a multiple)
  block: int = 0  # splash: the query and key block size
  reason: str = ""  # why the fused kernel (auto's or the named one) does not serve, or ""

  def pads(self, layer: Layer) -> bool:
    return (self.q_len, self.kv_len, self.head_dim) != (layer.q_len, layer.kv_len,
                                                        layer.head_dim)

  def describe(self) -> str:
    shape = f" at {self.q_len}x{self.kv_len}, head dim {self.head_dim}" if self.kernel in (
        "cudnn", "splash") else ""
    extra = (f" ({self.q_len // self.chunk} chunks{', rematerialised' if self.remat else ''})"
             if self.kernel == "chunked" else "")
    return f"{self.kernel}{shape}{extra}"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def cudnn_refusal(layer: Layer, backend: Backend) -> str:
  """Why cuDNN's fused attention cannot take `layer` on `backend` ("" if it can)."""
  if backend.platform != "gpu" or not backend.cuda:
    return f"cuDNN needs an NVIDIA GPU ({backend.platform} here)"
  if backend.capability is None or backend.capability < (8, 0):
    return f"cuDNN flash attention needs compute capability >= 8.0 (have {backend.capability})"
  if layer.dtype not in HALF:
    return f"cuDNN takes bfloat16 / float16, not {layer.dtype}"
  limit = 256 if backend.hopper else 128
  if layer.head_dim % 8 or layer.head_dim > limit:
    return f"head dim {layer.head_dim} is not a multiple of 8 <= {limit}"
  if layer.bias or layer.mask:
    return "an additive bias or a free-form mask"
  return ""


def splash_refusal(layer: Layer, backend: Backend) -> str:
  """Why the Pallas splash kernel cannot (or should not) take `layer` ("" if it can)."""
  if backend.platform != "tpu":
    return f"the splash kernel is for TPUs ({backend.platform} here)"
  if layer.bias or layer.mask or layer.causal:
    return "an additive bias, a free-form mask or causality"
  block = splash_block(layer.q_len, layer.kv_len)
  work = _round_up(layer.q_len, block) * _round_up(layer.kv_len, block)
  if work > SPLASH_MAX_PADDING * layer.q_len * layer.kv_len:
    return (f"padding {layer.q_len}x{layer.kv_len} to blocks of {block} would cost "
            f"{work / (layer.q_len * layer.kv_len):.1f}x the work")
  return ""


def splash_block(q_len: int, kv_len: int) -> int:
  """The largest block that leaves both lengths unpadded, else the smallest block."""
  for block in SPLASH_BLOCKS:
    if q_len % block == 0 and kv_len % block == 0:
      return block
  return SPLASH_BLOCKS[-1]


def _xla_or_chunked(layer: Layer, differentiated: bool, reason: str) -> Choice:
  if layer.q_len <= CHUNK or layer.bias or layer.mask or layer.causal:
    return Choice("xla", layer.q_len, layer.kv_len, layer.head_dim, reason=reason)
  pieces = -(-layer.q_len // CHUNK)
  chunk = -(-layer.q_len // pieces)
  return Choice("chunked", pieces * chunk, layer.kv_len, layer.head_dim, remat=differentiated,
                chunk=chunk, reason=reason)


def _fused(layer: Layer, backend: Backend, kernel: str, differentiated: bool) -> Choice | str:
  """The fused kernel's Choice, or the reason it cannot serve."""
  if kernel == "cudnn":
    why = cudnn_refusal(layer, backend)
    if why:
      return why
    q_len, kv_len = layer.q_len, layer.kv_len
    if differentiated and (q_len % 2 or kv_len % 2):
      q_len, kv_len = _round_up(q_len, 8), _round_up(kv_len, 8)
    return Choice("cudnn", q_len, kv_len, layer.head_dim)
  why = splash_refusal(layer, backend)
  if why:
    return why
  block = splash_block(layer.q_len, layer.kv_len)
  return Choice("splash", _round_up(layer.q_len, block), _round_up(layer.kv_len, block),
                _round_up(layer.head_dim, LANES), block=block)


FUSED = {"gpu": "cudnn", "tpu": "splash"}


def choose(layer: Layer, backend: Backend, requested: str = "auto",
           differentiated: bool = False) -> Choice:
  """The kernel that serves `layer` on `backend` (see the module docstring for the rules)."""
  if requested not in REQUESTS:
    raise ValueError(f"attention implementation {requested!r} is not one of {REQUESTS}")
  if requested == "xla":
    return Choice("xla", layer.q_len, layer.kv_len, layer.head_dim)
  if requested == "chunked":
    return _xla_or_chunked(layer, differentiated, "")
  fused = FUSED.get(backend.platform) if requested == "auto" else requested
  if fused is None:
    return _xla_or_chunked(layer, differentiated, "")
  got = _fused(layer, backend, fused, differentiated)
  if isinstance(got, Choice):
    return got
  return _xla_or_chunked(layer, differentiated, got)
