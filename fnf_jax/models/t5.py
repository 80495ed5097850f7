"""T5's encoder as a linen module, mirroring transformers' PyTorch `T5EncoderModel`, and its loader.

RAHF's reward model fuses image and prompt in a T5 encoder (t5-base): it feeds `inputs_embeds` =
[projected image tokens ; `embed(prompt ids)`], so the module takes token ids or embeddings, and
an attention mask. Gradients flow through `inputs_embeds` (RAHF backprops to the image).

Submodules keep transformers' names (`shared`, `encoder/block_0/layer_0/SelfAttention/q`,
`encoder/block_N/layer_1/DenseReluDense/wi_0`, `encoder/final_layer_norm`, ...) so
`fnf_jax.models.convert.to_params` maps checkpoints without a per-layer table. What differs from
a plain pre-norm transformer, as in T5:
  * RMS layer norm (no mean subtraction, no bias), statistics in float32;
  * no biases anywhere, and no 1/sqrt(head_dim) on q·k (T5 folds it into its initialisation);
  * no position embeddings: a learned per-head bias indexed by bucketed relative position, held
    by block 0's attention only and added to the scores of every layer.
Params are float32; compute runs in `dtype`; attention scores and softmax in float32.
Dropout is not implemented (inference and reward gradients only).
"""

import dataclasses
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.models import convert
from fnf_jax.models.attention import attention
from fnf_jax.models.layers import ACTIVATIONS, EMBED, MLP, NORM, VOCAB, dense

Dtype = Any


MODEL_TYPE = "t5"


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder's part of transformers' T5Config (defaults as transformers', i.e. t5-small's
  widths). `dense_act_fn` and `is_gated_act` are derived from `feed_forward_proj` exactly as
  transformers derives them, so they are properties, not fields."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"  # "relu", "gated-gelu", or generally "<act>" / "gated-<act>"
  pad_token_id: int | None = 0
  eos_token_id: int | None = 1

  def __post_init__(self):
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not of the form "
                       "'<act>' or 'gated-<act>' (e.g. 'relu', 'gated-gelu')")
    if self.dense_act_fn not in ACTIVATIONS:
      raise ValueError(f"T5 feed_forward_proj {self.feed_forward_proj!r}: activation "
                       f"{self.dense_act_fn!r} is not one of {sorted(ACTIVATIONS)}")

  @property
  def dense_act_fn(self) -> str:
    # transformers maps "gated-gelu" to the tanh approximation (what T5 v1.1 was trained with);
    # any other name is taken as written ("gated-silu" -> silu, "gelu" -> exact gelu).
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.split("-")[0] == "gated"

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
    """A transformers config.json (T5EncoderModel / T5Model / T5ForConditionalGeneration)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: v for k, v in d.items() if k in names}
    if isinstance(out.get("eos_token_id"), (list, tuple)):
      out["eos_token_id"] = out["eos_token_id"][0] if out["eos_token_id"] else None
    return cls(**out)


PRESETS: dict[str, T5Config] = {
    # google-t5/t5-base: the original T5 (ReLU feed-forward), RAHF's fusion encoder.
    "t5-base": T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "t5-small": T5Config(),
    "t5-large": T5Config(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    # T5 v1.1 and FLAN-T5 base: gated-GELU feed-forward, narrower d_ff.
    "t5-v1_1-base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                             feed_forward_proj="gated-gelu"),
    "flan-t5-base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                             feed_forward_proj="gated-gelu"),
}


# ------------------------------------------------------------------------- relative positions


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of `relative_position` (= key position - query position).

  Half the buckets are for keys after the query, half for keys before; within each half,
  distances below max_exact = num_buckets // 4 get a bucket each, larger ones log-spaced
  buckets up to max_distance, beyond which all share the last. Computed on the host in float32
  with transformers' order of operations: the sequence length is static, so this is a constant
  of the compiled program, identical on every backend (the integer cast of the log term is
  where a different rounding would move a position to the neighbouring bucket).
  """
  relative_position = np.asarray(relative_position, np.int64)
  half = num_buckets // 2
  buckets = (relative_position > 0).astype(np.int64) * half
  distance = np.abs(relative_position)
  max_exact = half // 2
  # max(distance, 1): the log of 0 is never selected below, but would warn.
  scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


# ---------------------------------------------------------------------------------- layers


class T5LayerNorm(nn.Module):
  """RMS norm: x / sqrt(mean(x²) + eps) * scale, statistics in float32, no mean, no bias."""
  epsilon: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # "scale" is where convert maps transformers' `layer_norm.weight`.
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             (NORM,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(variance + self.epsilon) * scale).astype(self.dtype)


class T5Attention(nn.Module):
  """Multi-head self-attention with T5's additive relative position bias and no q·k scaling.

  Block 0's instance owns `relative_attention_bias` [num_buckets, heads] and computes the
  [1, heads, T, T] bias; later blocks receive it (transformers shares it the same way).
  """
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Dtype = jnp.float32

  def compute_bias(self, length: int) -> jax.Array:
    c = self.config
    table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, param_dtype=jnp.float32,
                     name="relative_attention_bias",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(c.d_model ** -0.5), (None, None)))
    positions = np.arange(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                       c.relative_attention_num_buckets,
                                       c.relative_attention_max_distance)
    values = jnp.take(table.embedding, jnp.asarray(buckets), axis=0)  # [T, T, heads]
    return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, position_bias: jax.Array | None,
               mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    c = self.config
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, c.num_heads, c.d_kv)
    q, k, v = (split(dense(c.inner_dim, (EMBED, MLP), dtype=self.dtype, use_bias=False,
                           name=n)(x)) for n in ("q", "k", "v"))
    if position_bias is None:
      if not self.has_relative_attention_bias:
        raise ValueError("a T5 attention without relative_attention_bias needs the position "
                         "bias of block 0")
      position_bias = self.compute_bias(t)
    # No 1/sqrt(d_kv): T5's q initialisation absorbs it, and the checkpoints expect none. The
    # bias keeps the layer on XLA (attention/choice.py); a masked key gets a large negative
    # logit, not -inf, as in transformers: a fully masked row averages the values, no NaN.
    out = attention(q, k, v, bias=position_bias, mask=mask, scale=1.0)
    out = dense(c.d_model, (MLP, EMBED), dtype=self.dtype, use_bias=False,
                name="o")(out.reshape(b, t, c.inner_dim))
    return out, position_bias


class T5LayerSelfAttention(nn.Module):
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias, mask):
    h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    out, position_bias = T5Attention(self.config, self.has_relative_attention_bias, self.dtype,
                                     name="SelfAttention")(h, position_bias, mask)
    return x + out, position_bias


class T5DenseActDense(nn.Module):
  """wo(act(wi(x))): the original T5's feed-forward ("relu")."""
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    h = ACTIVATIONS[c.dense_act_fn](dense(c.d_ff, (EMBED, MLP), dtype=self.dtype,
                                          use_bias=False, name="wi")(x))
    return dense(c.d_model, (MLP, EMBED), dtype=self.dtype, use_bias=False, name="wo")(h)


class T5DenseGatedActDense(nn.Module):
  """wo(act(wi_0(x)) * wi_1(x)): T5 v1.1 / FLAN-T5's feed-forward ("gated-<act>")."""
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    gate = ACTIVATIONS[c.dense_act_fn](dense(c.d_ff, (EMBED, MLP), dtype=self.dtype,
                                             use_bias=False, name="wi_0")(x))
    linear = dense(c.d_ff, (EMBED, MLP), dtype=self.dtype, use_bias=False, name="wi_1")(x)
    return dense(c.d_model, (MLP, EMBED), dtype=self.dtype, use_bias=False,
                 name="wo")(gate * linear)


class T5LayerFF(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    ff = T5DenseGatedActDense if self.config.is_gated_act else T5DenseActDense
    # transformers calls both variants "DenseReluDense".
    return x + ff(self.config, self.dtype, name="DenseReluDense")(h)


class T5Block(nn.Module):
  """layer_0: pre-norm self-attention; layer_1: pre-norm feed-forward (transformers' layout)."""
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias, mask):
    x, position_bias = T5LayerSelfAttention(self.config, self.has_relative_attention_bias,
                                            self.dtype, name="layer_0")(x, position_bias, mask)
    return T5LayerFF(self.config, self.dtype, name="layer_1")(x), position_bias


class T5Stack(nn.Module):
  """transformers' encoder T5Stack (without its embed_tokens, which is `shared`)."""
  config: T5Config
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each block in the backward pass (reward gradients)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    block_cls = nn.remat(T5Block) if self.remat else T5Block
    position_bias = None
    for i in range(self.config.num_layers):
      x, position_bias = block_cls(self.config, i == 0, self.dtype,
                                   name=f"block_{i}")(x, position_bias, mask)
    return T5LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)


class T5Encoder(nn.Module):
  """transformers' T5EncoderModel: `shared` token embedding + encoder stack.

  `embed(input_ids)` -> token embeddings [B, T, d_model] in `dtype`;
  `__call__(input_ids=None, *, inputs_embeds=None, attention_mask=None)` -> last_hidden_state
  [B, T, d_model] (after final_layer_norm). Pass exactly one of input_ids / inputs_embeds;
  attention_mask [B, T] is 1 (or True) for tokens to attend to, 0 for padding.
  """
  config: T5Config
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    self.shared = nn.Embed(c.vocab_size, c.d_model, param_dtype=jnp.float32,
                           embedding_init=nn.with_logical_partitioning(
                               nn.initializers.normal(1.0), (VOCAB, EMBED)))
    self.encoder = T5Stack(c, self.dtype, self.remat)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.shared(input_ids).astype(self.dtype)

  def __call__(self, input_ids: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("T5Encoder takes exactly one of input_ids or inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    if x.shape[-1] != self.config.d_model:
      raise ValueError(f"inputs_embeds have width {x.shape[-1]}; this T5 takes d_model="
                       f"{self.config.d_model}")
    mask = None
    if attention_mask is not None:
      if attention_mask.shape != x.shape[:2]:
        raise ValueError(f"attention_mask has shape {attention_mask.shape}; the inputs are "
                         f"[B, T] = {x.shape[:2]}")
      mask = (attention_mask > 0)[:, None, None, :]  # [B, 1 (heads), 1 (queries), T (keys)]
    return self.encoder(x, mask)


# ---------------------------------------------------------------------------------- loading

# Keys of T5Model / T5ForConditionalGeneration that the encoder has no use for.
_IGNORE = (r"^decoder\.", r"^lm_head\.")
_SHARED = "shared.weight"
_EMBED_TOKENS = "encoder.embed_tokens.weight"


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: T5Config, *,
                           where: str, prefix: str = "") -> dict:
  """A transformers T5 state dict (encoder, T5Model or T5ForConditionalGeneration keys) ->
  float32 numpy params of `T5Encoder(config)`.

  Only keys starting with `prefix` are read, with it stripped (RAHF's checkpoint holds its T5
  under "t5."; the other keys are not this module's). decoder.* and lm_head.* are ignored.
  `encoder.embed_tokens.weight` is transformers' tied alias of `shared.weight`: either may be
  the one in the file (safetensors keeps one name of a tied pair); if both are, they must agree.
  `where` names the source in errors.
  """
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not sd:
    raise convert.CheckpointError(f"no weights under the prefix {prefix!r} in {where}")
  if _EMBED_TOKENS in sd:
    alias = sd.pop(_EMBED_TOKENS)
    if _SHARED not in sd:
      sd[_SHARED] = alias
    elif (np.shape(alias) != np.shape(sd[_SHARED])
          or not np.array_equal(np.asarray(alias), np.asarray(sd[_SHARED]))):
      # transformers ties the two; a file where they differ is ambiguous, not ours to pick.
      raise convert.CheckpointError(
          f"{prefix}{_SHARED} and {prefix}{_EMBED_TOKENS} in {where} differ; T5 ties them, so "
          "the checkpoint is inconsistent")
  module = T5Encoder(config)
  abstract = convert.abstract_params(module, jnp.zeros((1, 1), jnp.int32))
  return convert.to_params(sd, abstract, where=where, ignore=_IGNORE)


def read_config(folder: str) -> T5Config:
  """`folder`'s config.json as a T5Config; CheckpointError naming the folder when it is not T5."""
  raw = convert.read_config(folder)
  model_type = raw.get("model_type")
  if model_type != MODEL_TYPE:
    arch = (raw.get("architectures") or ["?"])[0]
    raise convert.CheckpointError(
        f"{os.path.join(folder, 'config.json')!r} has model_type {model_type!r} ({arch}), not "
        f"{MODEL_TYPE!r}: expected a transformers T5EncoderModel / T5Model / "
        "T5ForConditionalGeneration folder")
  try:
    return T5Config.from_dict(raw)
  except (TypeError, ValueError) as e:
    raise convert.CheckpointError(f"{os.path.join(folder, 'config.json')!r}: {e}") from e


def load(folder: str, *, dtype="float32", remat: bool = False) -> tuple[T5Encoder, dict]:
  """A transformers T5 folder (config.json + model.safetensors) -> (T5Encoder, params).

  T5EncoderModel, T5Model and T5ForConditionalGeneration folders all load (the decoder and
  lm_head are skipped). Params are float32 host numpy arrays; `dtype` is the compute dtype.
  """
  config = read_config(folder)  # before the weights: a wrong folder fails fast
  state_dict = convert.read_state_dict(convert.find_weights(folder))
  params = params_from_state_dict(state_dict, config, where=folder)
  return T5Encoder(config, dtype=jnp.dtype(dtype), remat=remat), params
