"""Building blocks of the Stable Diffusion UNet (see `fnf_jax.models.unet`), NHWC.

Each module and submodule carries the name of the diffusers PyTorch module it mirrors
(`resnets_0/conv1`, `attentions_1/transformer_blocks_0/attn2/to_out_0`, `ff/net_0/proj`, ...) so
that `fnf_jax.models.convert.to_params` maps checkpoints without a per-layer table. Only the
variants Stable Diffusion 1.x / 2.x / XL use are implemented; `UNetConfig` rejects the others.
The resnet and resampling blocks are shared with the VAE (`fnf_jax.models.blocks`).
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fnf_jax.models import layers
from fnf_jax.models.attention import attention
from fnf_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from fnf_jax.models.layers import EMBED, MLP

Dtype = layers.Dtype


def constrain(x: jax.Array) -> jax.Array:
  """Shards activations over the batch only; a no-op unless logical axis rules are active."""
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """diffusers' sinusoidal `get_timestep_embedding`, always float32.

  Timesteps reach ~1000: in bfloat16 the phases would be off by whole radians.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  phases = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(phases), jnp.cos(phases)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def activation(name: str | None):
  """The activations SD configs use by name (validated by UNetConfig); None is the identity."""
  if name is None:
    return lambda x: x
  return nn.silu  # "silu" / "swish"


class TimestepEmbedding(nn.Module):
  """linear_1 -> act -> linear_2 (-> post_act), for timesteps and SDXL's added conditions."""
  features: int
  act_fn: str = "silu"
  post_act_fn: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.features, (None, EMBED), dtype=self.dtype, name="linear_1")(x)
    x = activation(self.act_fn)(x)
    x = layers.dense(self.features, (EMBED, EMBED), dtype=self.dtype, name="linear_2")(x)
    return activation(self.post_act_fn)(x)


class Attention(nn.Module):
  """Multi-head attention without q/k/v biases (diffusers' `Attention`, attention_bias=False)."""
  heads: int
  upcast: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = x.shape[-1]
    q = layers.dense(inner, dtype=self.dtype, use_bias=False, name="to_q")(x)
    k = layers.dense(inner, dtype=self.dtype, use_bias=False, name="to_k")(context)
    v = layers.dense(inner, dtype=self.dtype, use_bias=False, name="to_v")(context)
    split = lambda t: t.reshape(*t.shape[:2], self.heads, inner // self.heads)
    out = attention(split(q), split(k), split(v), implementation=self.attention_impl,
                           upcast=self.upcast)
    out = out.reshape(*out.shape[:2], inner)
    return layers.dense(x.shape[-1], (MLP, EMBED), dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.dense(2 * self.features, dtype=self.dtype, name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)  # torch's F.gelu default is the exact erf form


class FeedForward(nn.Module):
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GEGLU(x.shape[-1] * self.mult, dtype=self.dtype, name="net_0")(x)
    return layers.dense(x.shape[-1], (MLP, EMBED), dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention on the text and GEGLU feed-forward."""
  heads: int
  upcast: bool = False
  norm_eps: float = 1e-5
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    norm = lambda name: layers.layer_norm(self.norm_eps, dtype=self.dtype, name=name)
    attn = lambda name: Attention(self.heads, self.upcast, self.attention_impl, self.dtype,
                                  name=name)
    x = x + attn("attn1")(norm("norm1")(x))
    x = x + attn("attn2")(norm("norm2")(x), context)
    return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
  """GroupNorm, proj_in, `num_layers` transformer blocks over the H*W tokens, proj_out, residual.

  `use_linear_projection` (SD 2.x, XL) projects with Linear after flattening; otherwise (SD 1.x)
  with a 1x1 conv before it. Both are the same map, but the checkpoints' weight shapes differ.
  """
  heads: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  upcast: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute each transformer block in the backward pass

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    inner = self.heads * (c // self.heads)
    y = layers.group_norm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      y = layers.dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
    else:
      y = layers.conv(inner, 1, dtype=self.dtype, name="proj_in")(y).reshape(b, h * w, inner)
    block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for i in range(self.num_layers):
      y = block(self.heads, self.upcast, attention_impl=self.attention_impl, dtype=self.dtype,
                name=f"transformer_blocks_{i}")(y, context)
    if self.use_linear_projection:
      y = layers.dense(c, (MLP, EMBED), dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
    else:
      y = layers.conv(c, 1, dtype=self.dtype, name="proj_out")(y.reshape(b, h, w, inner))
    return y + x


class BlockSpec(nn.Module):
  """Settings shared by every down / mid / up block (a base class, never instantiated)."""
  out_channels: int
  num_layers: int
  # Transformer depth after each resnet; empty for blocks without attention.
  transformer_layers: Sequence[int] = ()
  heads: int = 8
  groups: int = 32
  eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  # Recompute each resnet and transformer block in the backward pass: a gradient step then
  # holds one block's activations at a time instead of the whole UNet's.
  remat: bool = False

  def resnet(self, i: int, out_channels: int | None = None, scale: float = 1.0) -> ResnetBlock2D:
    cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    return cls(out_channels or self.out_channels, self.groups, self.eps, scale,
               dtype=self.dtype, name=f"resnets_{i}")

  def transformer(self, i: int) -> Transformer2DModel:
    return Transformer2DModel(self.heads, self.transformer_layers[i], self.groups,
                              self.use_linear_projection, self.upcast_attention,
                              self.attention_impl, self.dtype, remat=self.remat,
                              name=f"attentions_{i}")


class DownBlock(BlockSpec):
  """CrossAttnDownBlock2D (with `transformer_layers`) or DownBlock2D (without).

  Returns the output and the skip connections it hands to the up blocks.
  """
  add_downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for i in range(self.num_layers):
      x = self.resnet(i)(x, temb)
      if self.transformer_layers:
        x = self.transformer(i)(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype,
                       name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(BlockSpec):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) `num_layers` times."""
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.resnet(0, scale=self.output_scale_factor)(x, temb)
    for i in range(self.num_layers):
      x = self.transformer(i)(x, context)
      x = self.resnet(i + 1, scale=self.output_scale_factor)(x, temb)
    return x


class UpBlock(BlockSpec):
  """CrossAttnUpBlock2D (with `transformer_layers`) or UpBlock2D; consumes skips last-first."""
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None):
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = self.resnet(i)(x, temb)
      if self.transformer_layers:
        x = self.transformer(i)(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, upsample_size)
    return x
