"""CLIP in Flax linen: the text tower (SD / SDXL text encoders) and the vision tower (rewards).

Modules mirror transformers' PyTorch CLIP, submodule for submodule and with the same names
(`text_model/encoder/layers_0/self_attn/q_proj`, `vision_model/pre_layrnorm`, ...), so
`fnf_jax.models.convert.to_params` maps transformers checkpoints with no per-layer table.
OpenCLIP / OpenAI state dicts are re-laid out into transformers' key names first
(`openclip_to_transformers`).

  load_text_encoder(folder)  a diffusers `text_encoder/` folder (CLIPTextModel or
                             CLIPTextModelWithProjection) -> (CLIPTextModel module, params)
  load(path)                 a CLIPModel (transformers folder or OpenCLIP file) -> `Clip`, with
                             encode_image / encode_text and pure `image_features(params, ...)`.

Parameters are float32; `dtype` is the compute dtype. Images are NHWC.
"""

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.models import clip_tokenizer
from fnf_jax.models import convert
from fnf_jax.models.layers import EMBED, MLP, VOCAB, attention, dense, layer_norm

Dtype = Any

# CLIP's image normalisation (OpenAI's, also used by every OpenCLIP model we support).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' ACT2FN names -> functions ("gelu" is the exact erf form, as torch's default).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
# transformers' pooling rule: configs written before transformers PR #24773 say eos_token_id=2
# and pool at argmax(input_ids), which is the end-of-text token of the real vocabulary (49407,
# the largest id). OpenCLIP pools the same way, so its configs use 2 as well.
LEGACY_EOS_TOKEN_ID = 2


def _fields_of(cls, d: Mapping[str, Any]) -> dict:
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' CLIPTextConfig (defaults as transformers 5's)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    return cls(**_fields_of(cls, d))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' CLIPVisionConfig."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
    return cls(**_fields_of(cls, d))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers' CLIPConfig: both towers and the shared projection width."""
  text_config: CLIPTextConfig = CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
    out = _fields_of(cls, d)
    out["text_config"] = CLIPTextConfig.from_dict(d.get("text_config") or {})
    out["vision_config"] = CLIPVisionConfig.from_dict(d.get("vision_config") or {})
    return cls(**out)


def _preset(width, layers, heads, patch, text_width, text_layers, text_heads, proj, act):
  return CLIPConfig(
      text_config=CLIPTextConfig(
          hidden_size=text_width, intermediate_size=4 * text_width, projection_dim=proj,
          num_hidden_layers=text_layers, num_attention_heads=text_heads, hidden_act=act,
          eos_token_id=LEGACY_EOS_TOKEN_ID),
      vision_config=CLIPVisionConfig(
          hidden_size=width, intermediate_size=4 * width, projection_dim=proj,
          num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch,
          hidden_act=act),
      projection_dim=proj)


# The published configs (openai/clip-vit-base-patch32, openai/clip-vit-large-patch14,
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K). OpenAI's models use quick_gelu, LAION's exact gelu.
PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-32": _preset(768, 12, 12, 32, 512, 12, 8, 512, "quick_gelu"),
    "ViT-L-14": _preset(1024, 24, 16, 14, 768, 12, 12, 768, "quick_gelu"),
    "ViT-H-14": _preset(1280, 32, 16, 14, 1024, 24, 16, 1024, "gelu"),
}
VIT_B_32, VIT_L_14, VIT_H_14 = PRESETS["ViT-B-32"], PRESETS["ViT-L-14"], PRESETS["ViT-H-14"]


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
  # Embedding tables stay float32 (like the other params); the lookups are cast by the caller.
  return nn.Embed(num, features, param_dtype=jnp.float32, name=name,
                  embedding_init=nn.with_logical_partitioning(
                      nn.initializers.normal(0.02), axes))


class CLIPAttention(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  causal: bool
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

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
  attention_impl: str = "xla"

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
  attention_impl: str = "xla"
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
  attention_impl: str = "xla"
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
  attention_impl: str = "xla"
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
  attention_impl: str = "xla"
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
  attention_impl: str = "xla"
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


# --------------------------------------------------------------------------- preprocessing


def preprocess_images(images: jax.Array, image_size: int) -> jax.Array:
  """[B, H, W, 3] in [0, 1] -> CLIP's normalised [B, image_size, image_size, 3], differentiably.

  Non-square images are centre-cropped to a square first (CLIP's processor resizes the short
  side and centre-crops: the same region). The resize is jax's bicubic, which antialiases when
  shrinking (Keys a=-0.5 kernel stretched by the scale): the filter of PIL's bicubic that CLIP's
  image processor uses, and equal (to float rounding) to torch's
  `interpolate(mode="bicubic", antialias=True)`; torch's default antialias=False differs (a=-0.75,
  aliasing). Images already at image_size are not resampled at all.
  """
  b, h, w, ch = images.shape
  if h != w:
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    images = images[:, top:top + s, left:left + s]
  if images.shape[1] != image_size:
    images = jax.image.resize(images.astype(jnp.float32), (b, image_size, image_size, ch),
                              method="bicubic")
  mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
  std = jnp.asarray(IMAGE_STD, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


# ------------------------------------------------------------------------------ conversion

# Buffers of transformers checkpoints (older ones saved position_ids) that are no parameters.
_IGNORE = (r"(^|\.)position_ids$",)


def openclip_to_transformers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Re-lays an OpenCLIP / OpenAI CLIP state dict out as transformers' CLIPModel keys.

  OpenCLIP fuses q/k/v into `attn.in_proj_weight` ([3D, D], q first) and keeps the projections
  as matrices used as `x @ proj`, where transformers has Linear weights (`proj.T`).
  """
  prefix_map = (
      (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
      (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
  )
  leaf_map = {
      "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
      "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
  }
  simple = {
      "visual.class_embedding": "vision_model.embeddings.class_embedding",
      "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
      "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
      "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
      "positional_embedding": "text_model.embeddings.position_embedding.weight",
  }
  norms = {"visual.ln_pre": "vision_model.pre_layrnorm",
           "visual.ln_post": "vision_model.post_layernorm",
           "ln_final": "text_model.final_layer_norm"}
  # Non-parameters of OpenAI's JIT archives and OpenCLIP's attention-mask buffer.
  skip = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key in skip:
      continue
    if key == "logit_scale":
      out[key] = value.reshape(())  # a 0-d parameter; some exporters write it as [1]
    elif key in simple:
      out[simple[key]] = value
    elif key in ("visual.proj", "text_projection"):
      name = "visual_projection" if key == "visual.proj" else "text_projection"
      out[f"{name}.weight"] = value.T
    elif key.rsplit(".", 1)[0] in norms:
      base, leaf = key.rsplit(".", 1)
      out[f"{norms[base]}.{leaf}"] = value
    else:
      new = key
      for pattern, repl in prefix_map:
        new = re.sub(pattern, repl, new)
      if new == key:
        out[key] = value  # unknown: to_params names it in its error
        continue
      layer, rest = re.match(r"^(.*\.layers\.\d+)\.(.*)$", new).groups()
      if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = "weight" if rest.endswith("weight") else "bias"
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
          out[f"{layer}.self_attn.{name}.{leaf}"] = part
        continue
      base, leaf = rest.rsplit(".", 1)
      out[f"{layer}.{leaf_map.get(base, base)}.{leaf}"] = value
  return out


def _openclip_shapes(sd: Mapping[str, np.ndarray]) -> dict[str, int]:
  """What an OpenCLIP state dict's shapes say about its architecture."""
  def count(prefix):  # number of distinct layer indices after `prefix`
    return len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

  patch = sd["visual.conv1.weight"].shape[-1]
  grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  return {
      "vision_width": sd["visual.conv1.weight"].shape[0],
      "vision_mlp": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      "vision_layers": count("visual.transformer.resblocks."),
      "image_size": grid * patch,
      "patch_size": patch,
      "text_width": sd["ln_final.weight"].shape[0],
      "text_mlp": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      "text_layers": count("transformer.resblocks."),
      "vocab_size": sd["token_embedding.weight"].shape[0],
      "context_length": sd["positional_embedding"].shape[0],
      "projection_dim": sd["text_projection"].shape[1],
  }


def _preset_shapes(c: CLIPConfig) -> dict[str, int]:
  v, t = c.vision_config, c.text_config
  return {
      "vision_width": v.hidden_size, "vision_mlp": v.intermediate_size,
      "vision_layers": v.num_hidden_layers, "image_size": v.image_size,
      "patch_size": v.patch_size, "text_width": t.hidden_size, "text_mlp": t.intermediate_size,
      "text_layers": t.num_hidden_layers, "vocab_size": t.vocab_size,
      "context_length": t.max_position_embeddings, "projection_dim": c.projection_dim,
  }


def config_from_openclip(state_dict: Mapping[str, np.ndarray]) -> CLIPConfig:
  """The preset whose shapes an OpenCLIP / OpenAI state dict has.

  Neither the head count (OpenCLIP's head width is 64 for most towers but 80 for ViT-H's vision
  tower) nor the activation (quick_gelu for OpenAI-trained models, gelu for OpenCLIP-trained
  ones) is in the weights, so anything but a known preset needs an explicit config.
  """
  shapes = _openclip_shapes(state_dict)
  for preset in PRESETS.values():
    if _preset_shapes(preset) == shapes:
      return preset
  raise convert.CheckpointError(
      f"OpenCLIP weights with shapes {shapes} match no preset ({', '.join(PRESETS)}): pass "
      "`config=` (a CLIPConfig with the model's head counts and hidden_act)")


def _dtype(dtype) -> Any:
  return jnp.dtype(dtype)


def _text_rename(keys) -> list[tuple[str, str]]:
  # transformers 4 saved CLIPTextModel under "text_model."; transformers 5 saves it flat.
  if any(k.startswith("text_model.") for k in keys):
    return []
  return [(r"^(?!text_projection\.)", "text_model.")]


def load_text_encoder(folder: str, *, dtype="float32", attention_impl: str = "xla",
                      remat: bool = False) -> tuple[CLIPTextModel, dict]:
  """A diffusers/transformers text encoder folder -> (CLIPTextModel module, params).

  Params are float32 numpy arrays (place or shard them as you like); `dtype` is the compute dtype.
  """
  config, state_dict = convert.read_component(folder)
  arch = (config.get("architectures") or ["CLIPTextModel"])[0]
  if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
    raise convert.CheckpointError(
        f"{folder!r} holds a {arch}; load_text_encoder reads CLIPTextModel or "
        "CLIPTextModelWithProjection folders (use clip.load for a full CLIPModel)")
  module = CLIPTextModel(CLIPTextConfig.from_dict(config),
                         with_projection=arch == "CLIPTextModelWithProjection",
                         dtype=_dtype(dtype), attention_impl=attention_impl, remat=remat)
  abstract = convert.abstract_params(module, jnp.zeros((1, 1), jnp.int32))
  params = convert.to_params(state_dict, abstract, where=folder,
                             rename=_text_rename(state_dict), ignore=_IGNORE)
  return module, params


# ------------------------------------------------------------------------------ full model


@dataclasses.dataclass(eq=False)
class Clip:
  """A loaded CLIPModel: pure functions of (params, inputs) plus bound conveniences.

  `image_features(params, images)` / `vision_outputs(params, images)` take [B, H, W, 3] images in
  [0, 1] and are safe under jit and grad (resizing and normalisation happen inside);
  `text_features(params, input_ids)` takes token ids. `encode_image` / `encode_text` use the
  loaded params (and the tokenizer for text) and are jitted.
  """
  module: CLIPModel
  params: Any
  tokenizer: clip_tokenizer.ClipTokenizer | None = None

  def __post_init__(self):
    self._encode_image = jax.jit(self.image_features)
    self._encode_text = jax.jit(self.text_features)

  @property
  def config(self) -> CLIPConfig:
    return self.module.config

  @property
  def image_size(self) -> int:
    return self.config.vision_config.image_size

  def preprocess(self, images: jax.Array) -> jax.Array:
    return preprocess_images(images, self.image_size)

  def vision_outputs(self, params, images: jax.Array, perturbations=None) -> VisionOutput:
    """Every vision output: tokens of each layer (class token first, then the patches in
    row-major order), pooled and image_embeds. With `perturbations` (see
    `vision_perturbations`), differentiating with respect to them gives the gradient with
    respect to each layer's output tokens."""
    pixels = self.preprocess(images).astype(self.module.dtype)
    variables = {"params": params}
    if perturbations is not None:
      variables["perturbations"] = perturbations
    return self.module.apply(variables, pixels, method=CLIPModel.vision_outputs)

  def vision_perturbations(self, batch: int) -> dict:
    """Zeros for `vision_outputs(..., perturbations=)`, one per vision layer output:
    ["vision_model"]["encoder"][f"hidden_states_{i}"], [batch, 1 + patches, width]."""
    size = self.image_size
    shapes = jax.eval_shape(lambda: self.module.init(
        jax.random.key(0), jnp.zeros((batch, size, size, 3), self.module.dtype),
        method=CLIPModel.vision_outputs))["perturbations"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def image_features(self, params, images: jax.Array) -> jax.Array:
    """transformers' get_image_features of `images` ([B, H, W, 3] in [0, 1]): [B, P]."""
    return self.vision_outputs(params, images).image_embeds

  def text_outputs(self, params, input_ids: jax.Array) -> TextOutput:
    return self.module.apply({"params": params}, input_ids, method=CLIPModel.text_outputs)

  def text_features(self, params, input_ids: jax.Array) -> jax.Array:
    """transformers' get_text_features of token ids [B, T]: [B, P]."""
    return self.text_outputs(params, input_ids).text_embeds

  def tokenize(self, prompts) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError("this Clip was loaded without a tokenizer: pass `tokenizer=` to load")
    return self.tokenizer(prompts)

  def encode_image(self, images) -> jax.Array:
    return self._encode_image(self.params, jnp.asarray(images))

  def encode_text(self, prompts) -> jax.Array:
    return self._encode_text(self.params, jnp.asarray(self.tokenize(prompts)))


OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def _find_tokenizer(path: str, tokenizer) -> clip_tokenizer.ClipTokenizer | None:
  if isinstance(tokenizer, clip_tokenizer.ClipTokenizer):
    return tokenizer
  if isinstance(tokenizer, str):
    return clip_tokenizer.load(tokenizer)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  for candidate in (folder, os.path.join(folder, "tokenizer")):
    if os.path.isdir(candidate) and any(
        os.path.isfile(os.path.join(candidate, f))
        for f in (clip_tokenizer.TOKENIZER_JSON, clip_tokenizer.VOCAB_JSON)):
      return clip_tokenizer.load(candidate)
  return None  # encode_text then says how to pass one


def load(path: str, *, dtype="float32", attention_impl: str = "xla", remat: bool = False,
         config: CLIPConfig | str | None = None,
         tokenizer: "str | clip_tokenizer.ClipTokenizer | None" = None) -> Clip:
  """A CLIPModel -> `Clip`.

  `path` is a transformers folder (config.json with CLIPModel, model.safetensors) or an OpenCLIP
  / OpenAI state dict in safetensors (a file, or a folder holding one of OPENCLIP_FILES). For
  OpenCLIP weights `config` (a CLIPConfig or a PRESETS name) may be left out for the presets'
  shapes (see config_from_openclip). The tokenizer comes from `tokenizer` (a folder or a
  ClipTokenizer), else from the folder of `path` or its `tokenizer/` subfolder.
  """
  openclip_file = None
  if os.path.isfile(path):
    openclip_file = path
  elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
    found = [os.path.join(path, f) for f in OPENCLIP_FILES
             if os.path.isfile(os.path.join(path, f))]
    if not found:
      raise convert.CheckpointError(
          f"{path!r} holds neither a transformers CLIPModel (config.json + model.safetensors) "
          f"nor OpenCLIP weights ({', '.join(OPENCLIP_FILES)}); found {sorted(os.listdir(path))}")
    openclip_file = found[0]
  elif not os.path.exists(path):
    raise convert.CheckpointError(f"CLIP checkpoint not found: {path!r}")

  if openclip_file is not None:
    if not openclip_file.endswith(".safetensors"):
      raise convert.CheckpointError(f"{openclip_file!r}: fnf_jax reads safetensors only")
    raw = convert.read_state_dict([openclip_file])
    state_dict = openclip_to_transformers(raw)
    if isinstance(config, str):
      config = PRESETS[config]
    config = config or config_from_openclip(raw)
    where = openclip_file
  else:
    raw_config, state_dict = convert.read_component(path)
    arch = (raw_config.get("architectures") or ["CLIPModel"])[0]
    if arch != "CLIPModel":
      raise convert.CheckpointError(f"{path!r} holds a {arch}, not a CLIPModel")
    config = CLIPConfig.from_dict(raw_config)
    where = path

  module = CLIPModel(config, dtype=_dtype(dtype), attention_impl=attention_impl, remat=remat)
  size = config.vision_config.image_size
  abstract = convert.abstract_params(module, jnp.zeros((1, 1), jnp.int32),
                                     jnp.zeros((1, size, size, 3), jnp.float32))
  params = convert.to_params(state_dict, abstract, where=where, ignore=_IGNORE)
  return Clip(module=module, params=jax.device_put(params),
              tokenizer=_find_tokenizer(path, tokenizer))
