"""CLIP's text and vision towers as linen modules, mirroring transformers' PyTorch CLIP.

Submodules keep transformers' names (`text_model/encoder/layers_0/self_attn/q_proj`,
`vision_model/pre_layrnorm`, ...) so `fnf_jax.models.convert.to_params` maps its checkpoints
with no per-layer table. Modules create float32 params at init and compute in `dtype`.
Images are NHWC.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fnf_jax.models.clip.configs import (LEGACY_EOS_TOKEN_ID, CLIPConfig, CLIPTextConfig,
                                         CLIPVisionConfig)
from fnf_jax.models.attention import attention
from fnf_jax.models.layers import ACTIVATIONS, EMBED, MLP, VOCAB, dense, layer_norm

Dtype = Any



@flax.struct.dataclass
class TextOutput:
  """What transformers' CLIPTextModel(WithProjection) returns with output_hidden_states=True.

  hidden_states[0] is the embeddings output and hidden_states[i] the output of layer i, all
  WITHOUT the final layer norm (SDXL conditions on hidden_states[-2]); last_hidden_state has it.
  """
  last_hidden_state: jax.Array  # [B, T, D]
  hidden_states: tuple[jax.Array, ...]
  pooled: jax.Array  # [B, D], final-normed state at the end-of-text token
  text_embeds: jax.Array | None = None  # [B, P], text_projection(pooled) when projected


@flax.struct.dataclass
class VisionOutput:
  """What transformers' CLIPVisionModel(WithProjection) returns with output_hidden_states=True.

  last_hidden_state is the encoder output (class token first, then the patch tokens in row-major
  order), without post_layernorm, as in transformers.
  """
  last_hidden_state: jax.Array  # [B, 1 + patches, D]
  hidden_states: tuple[jax.Array, ...]
  pooled: jax.Array  # [B, D], post_layernorm(class token)
  image_embeds: jax.Array | None = None  # [B, P], visual_projection(pooled) when projected


# ----------------------------------------------------------------------------------- layers


def _embed(num: int, features: int, axes, name: str) -> nn.Embed:
  # Embedding tables are created float32 like every param; the lookups are cast by the caller.
  return nn.Embed(num, features, param_dtype=jnp.float32, name=name,
                  embedding_init=nn.with_logical_partitioning(
                      nn.initializers.normal(0.02), axes))


class CLIPAttention(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, width = x.shape
    heads = self.config.num_attention_heads
    split = lambda y: y.reshape(b, t, heads, width // heads)
    q, k, v = (split(dense(width, dtype=self.dtype, name=n)(x))
               for n in ("q_proj", "k_proj", "v_proj"))
    # jax's default scale 1/sqrt(head_dim) is CLIP's.
    out = attention(q, k, v, implementation=self.attention_impl, is_causal=self.causal)
    return dense(width, (MLP, EMBED), dtype=self.dtype, name="out_proj")(out.reshape(b, t, width))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.config.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act {self.config.hidden_act!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    h = dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = ACTIVATIONS[self.config.hidden_act](h)
    return dense(self.config.hidden_size, (MLP, EMBED), dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    eps = self.config.layer_norm_eps
    h = layer_norm(eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + CLIPAttention(self.config, self.causal, self.dtype, self.attention_impl,
                          name="self_attn")(h)
    h = layer_norm(eps, dtype=self.dtype, name="layer_norm2")(x)
    return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
  """The layer stack; returns every hidden state, input first (transformers' hidden_states)."""
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False  # recompute each layer in the backward pass (reward gradients)
  # Expose each layer output as a "perturbations" variable (see below); the vision tower does.
  perturb_outputs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    states = [x]
    for i in range(self.config.num_hidden_layers):
      x = layer_cls(self.config, self.causal, self.dtype, self.attention_impl,
                    name=f"layers_{i}")(x)
      # A no-op unless a "perturbations" collection is passed to apply: then the gradient with
      # respect to it is the gradient with respect to this layer's output (Grad-CAM).
      if self.perturb_outputs:
        x = self.perturb(f"hidden_states_{i + 1}", x)
      states.append(x)
    return tuple(states)


# -------------------------------------------------------------------------------- text tower


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    t = input_ids.shape[-1]
    if t > c.max_position_embeddings:
      raise ValueError(f"{t} tokens exceed max_position_embeddings={c.max_position_embeddings}")
    tokens = _embed(c.vocab_size, c.hidden_size, (VOCAB, EMBED), "token_embedding")(input_ids)
    positions = _embed(c.max_position_embeddings, c.hidden_size, (None, EMBED),
                       "position_embedding").embedding[:t]
    return (tokens + positions).astype(self.dtype)


def pool_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Position of the end-of-text token per row, exactly as transformers picks it."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  # The FIRST eos (pad may equal eos); argmax returns the first of equal maxima, like torch.
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nn.Module):
  """transformers' CLIPTextTransformer: embeddings, causal encoder, final LN, eos pooling."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> TextOutput:
    c = self.config
    x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
    states = CLIPEncoder(c, True, self.dtype, self.attention_impl, self.remat,
                         name="encoder")(x)
    last = layer_norm(c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(states[-1])
    index = pool_index(input_ids, c.eos_token_id)
    pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
    return TextOutput(last_hidden_state=last, hidden_states=states, pooled=pooled)


class CLIPTextModel(nn.Module):
  """transformers' CLIPTextModel, or CLIPTextModelWithProjection when `with_projection`.

  Call with int token ids [B, T]; returns a TextOutput (text_embeds set when projected).
  """
  config: CLIPTextConfig
  with_projection: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> TextOutput:
    out = CLIPTextTransformer(self.config, self.dtype, self.attention_impl, self.remat,
                              name="text_model")(input_ids)
    if self.with_projection:
      proj = dense(self.config.projection_dim, dtype=self.dtype, use_bias=False,
                   name="text_projection")
      out = out.replace(text_embeds=proj(out.pooled))
    return out


# ------------------------------------------------------------------------------ vision tower


class CLIPVisionEmbeddings(nn.Module):
  """Patchify (a stride-`patch` conv, no bias), prepend the class token, add positions."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    b, h, w, _ = pixels.shape
    if (h, w) != (c.image_size, c.image_size):
      raise ValueError(f"pixels are {h}x{w}; this CLIP takes {c.image_size}x{c.image_size} "
                       "(Clip.preprocess resizes)")
    p = c.patch_size
    patches = nn.Conv(
        c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
        dtype=self.dtype, param_dtype=jnp.float32, name="patch_embedding",
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, None, EMBED)))(pixels)
    # Row-major flattening of the patch grid, as torch's flatten(2) of an NCHW map.
    patches = patches.reshape(b, -1, c.hidden_size)
    cls = self.param("class_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(1.0), (EMBED,)),
                     (c.hidden_size,), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
    x = jnp.concatenate([cls, patches.astype(self.dtype)], axis=1)
    num_positions = (c.image_size // p) ** 2 + 1
    positions = _embed(num_positions, c.hidden_size, (None, EMBED), "position_embedding").embedding
    return (x + positions).astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
  """transformers' CLIPVisionTransformer: embeddings, pre_layrnorm, encoder, post_layernorm."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, pixels: jax.Array) -> VisionOutput:
    c = self.config
    x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
    # transformers' spelling "pre_layrnorm" is kept so checkpoint keys map one to one.
    x = layer_norm(c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
    states = CLIPEncoder(c, False, self.dtype, self.attention_impl, self.remat,
                         perturb_outputs=True, name="encoder")(x)
    pooled = layer_norm(c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(
        states[-1][:, 0])
    return VisionOutput(last_hidden_state=states[-1], hidden_states=states, pooled=pooled)


class CLIPModel(nn.Module):
  """transformers' CLIPModel: both towers, their projections and logit_scale.

  `__call__(input_ids, pixels)` runs both (used for init); apply with
  `method="text_outputs"` / `"vision_outputs"` to run one tower. `pixels` are normalised NHWC.
  """
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  def setup(self):
    c = self.config
    self.text_model = CLIPTextTransformer(c.text_config, self.dtype, self.attention_impl,
                                          self.remat)
    self.vision_model = CLIPVisionTransformer(c.vision_config, self.dtype, self.attention_impl,
                                              self.remat)
    self.text_projection = dense(c.projection_dim, dtype=self.dtype, use_bias=False)
    self.visual_projection = dense(c.projection_dim, dtype=self.dtype, use_bias=False)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(c.logit_scale_init_value), ()), (), jnp.float32)

  def text_outputs(self, input_ids: jax.Array) -> TextOutput:
    out = self.text_model(input_ids)
    return out.replace(text_embeds=self.text_projection(out.pooled))

  def vision_outputs(self, pixels: jax.Array) -> VisionOutput:
    out = self.vision_model(pixels)
    return out.replace(image_embeds=self.visual_projection(out.pooled))

  def __call__(self, input_ids: jax.Array, pixels: jax.Array):
    return self.text_outputs(input_ids), self.vision_outputs(pixels), self.logit_scale
