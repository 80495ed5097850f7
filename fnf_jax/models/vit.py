"""ViT image encoder in linen, mirroring transformers' PyTorch `ViTModel` (the RAHF reward model's
image tower: google/vit-large-patch16-384).

Submodules carry the names of the checkpoints transformers writes (`encoder/layer_0/attention/
attention/query`, `layernorm`, `pooler/dense`, ...), so `convert.to_params` maps a saved folder
with no per-layer table; transformers 5's in-memory names (`layers.0.attention.q_proj`, what
`model.state_dict()` returns) are renamed onto them. Params are float32; compute is in `dtype`.
Images are NHWC and already normalised (see `read_preprocessor` for the numbers).
"""

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.models import convert
from fnf_jax.models.attention import attention
from fnf_jax.models.layers import ACTIVATIONS, EMBED, MLP, conv, dense, layer_norm

Dtype = Any


def _pair(v, name: str) -> tuple[int, int]:
  pair = (v, v) if isinstance(v, int) else tuple(v)
  if len(pair) != 2 or not all(isinstance(x, int) and x > 0 for x in pair):
    raise ValueError(f"ViT {name} must be a positive int or (height, width); got {v!r}")
  return pair


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """transformers' ViTConfig (its defaults: google/vit-base-patch16-224). `image_size` is stored
  as (height, width); `patch_size` must be square, as transformers' interpolation assumes."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: tuple[int, int] = (224, 224)
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  pooler_output_size: int | None = None  # None: hidden_size
  pooler_act: str = "tanh"

  def __post_init__(self):
    object.__setattr__(self, "image_size", _pair(self.image_size, "image_size"))
    patch = _pair(self.patch_size, "patch_size")
    if patch[0] != patch[1]:
      raise ValueError(f"ViT patch_size {self.patch_size!r} is not square")
    object.__setattr__(self, "patch_size", patch[0])
    if self.pooler_output_size is None:
      object.__setattr__(self, "pooler_output_size", self.hidden_size)
    for name in ("hidden_act", "pooler_act"):
      if getattr(self, name) not in ACTIVATIONS:
        raise ValueError(f"ViT {name} {getattr(self, name)!r} is not one of {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"ViT hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")

  @property
  def grid(self) -> tuple[int, int]:
    """Patch rows and columns at `image_size`: the position embeddings' grid."""
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ViTConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {
    "vit-base-patch16-224": ViTConfig(),
    "vit-large-patch16-384": ViTConfig(hidden_size=1024, num_hidden_layers=24,
                                       num_attention_heads=16, intermediate_size=4096,
                                       image_size=384, patch_size=16),
}


@flax.struct.dataclass
class ViTOutput:
  """transformers' BaseModelOutputWithPooling with output_hidden_states=True."""
  last_hidden_state: jax.Array  # [B, 1 + patches, D] after the final layernorm, class token first
  hidden_states: tuple[jax.Array, ...]  # embeddings, then each layer's output, before layernorm
  pooled: jax.Array | None = None  # [B, pooler_output_size], act(dense(class token)) if pooler


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of torch's interpolate(mode="bicubic", align_corners=False) along one axis.

  torch samples at (i + 0.5) * in / out - 0.5 with Keys' cubic at a = -0.75 and clamps the four
  taps to the border; jax.image.resize uses a = -0.5 (and antialiases when shrinking), so it
  would not reproduce the position embeddings checkpoints were fine-tuned with.
  """
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    real = (i + 0.5) * in_size / out_size - 0.5
    first = int(np.floor(real))
    t = real - first
    for k, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
      weights[i, min(max(first - 1 + k, 0), in_size - 1)] += w
  return weights.astype(np.float32)


class ViTPatchEmbeddings(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    patches = conv(c.hidden_size, c.patch_size, stride=c.patch_size, padding=0,
                   dtype=self.dtype, name="projection")(pixels)
    # Row-major over the patch grid, as torch's flatten(2) of the NCHW map.
    return patches.reshape(pixels.shape[0], -1, c.hidden_size)


class ViTEmbeddings(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array, interpolate_pos_encoding: bool) -> jax.Array:
    c = self.config
    b, h, w, channels = pixels.shape
    if channels != c.num_channels:
      raise ValueError(f"pixels have {channels} channels (NHWC); this ViT takes {c.num_channels}")
    if not interpolate_pos_encoding and (h, w) != c.image_size:
      raise ValueError(f"pixels are {h}x{w}; this ViT takes {c.image_size[0]}x{c.image_size[1]}"
                       " (or pass interpolate_pos_encoding=True)")
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    cls = self.param("cls_token", init((None, None, EMBED)), (1, 1, c.hidden_size), jnp.float32)
    (gh, gw), d = c.grid, c.hidden_size
    positions = self.param("position_embeddings", init((None, None, EMBED)),
                           (1, gh * gw + 1, d), jnp.float32)
    patches = ViTPatchEmbeddings(c, self.dtype, name="patch_embeddings")(pixels)
    new = (h // c.patch_size, w // c.patch_size)
    if new != (gh, gw):
      # Separable bicubic on the grid, as static matrices; HIGHEST so that a default bfloat16
      # matmul precision (TPU) does not round the embeddings.
      grid = jnp.einsum("ih,hwd,jw->ijd", torch_bicubic_matrix(gh, new[0]),
                        positions[0, 1:].reshape(gh, gw, d), torch_bicubic_matrix(gw, new[1]),
                        precision=jax.lax.Precision.HIGHEST)
      positions = jnp.concatenate([positions[:, :1], grid.reshape(1, -1, d)], axis=1)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), patches], axis=1)
    return (x + positions).astype(self.dtype)


class _Dense(nn.Module):
  """One Dense named "dense" (then `act`): transformers' ViTSelfOutput, ViTIntermediate,
  ViTOutput and ViTPooler are such wrappers, and their names are in the checkpoint keys."""
  features: int
  axes: tuple[str, str] = (EMBED, MLP)
  act: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense(self.features, self.axes, dtype=self.dtype, name="dense")(x)
    return y if self.act is None else ACTIVATIONS[self.act](y)


class ViTSelfAttention(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, width = x.shape
    heads = self.config.num_attention_heads
    q, k, v = (dense(width, dtype=self.dtype, use_bias=self.config.qkv_bias, name=n)(x)
               .reshape(b, t, heads, width // heads) for n in ("query", "key", "value"))
    # jax's default scale 1/sqrt(head_dim) is ViT's.
    return attention(q, k, v, implementation=self.attention_impl).reshape(b, t, width)


class ViTAttention(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = ViTSelfAttention(self.config, self.dtype, self.attention_impl, name="attention")(x)
    return _Dense(self.config.hidden_size, (MLP, EMBED), dtype=self.dtype, name="output")(h)


class ViTLayer(nn.Module):
  """Pre-norm block: x + attention(layernorm_before(x)), then x + mlp(layernorm_after(x))."""
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    h = layer_norm(c.layer_norm_eps, dtype=self.dtype, name="layernorm_before")(x)
    x = x + ViTAttention(c, self.dtype, self.attention_impl, name="attention")(h)
    h = layer_norm(c.layer_norm_eps, dtype=self.dtype, name="layernorm_after")(x)
    h = _Dense(c.intermediate_size, act=c.hidden_act, dtype=self.dtype, name="intermediate")(h)
    return x + _Dense(c.hidden_size, (MLP, EMBED), dtype=self.dtype, name="output")(h)


class ViTEncoder(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    layer_cls = nn.remat(ViTLayer) if self.remat else ViTLayer
    states = [x]
    for i in range(self.config.num_hidden_layers):
      states.append(layer_cls(self.config, self.dtype, self.attention_impl,
                              name=f"layer_{i}")(states[-1]))
    return tuple(states)


class ViTModel(nn.Module):
  """transformers' ViTModel. Call with normalised NHWC pixels [B, H, W, C] -> ViTOutput.

  `interpolate_pos_encoding` (static under jit) resizes the position embeddings to another
  image size as transformers does; without it, only config.image_size is accepted. `remat`
  recomputes each layer in the backward pass (gradients of a reward through the tower).
  """
  config: ViTConfig
  dtype: Dtype = jnp.float32
  remat: bool = False
  add_pooling_layer: bool = True  # transformers' default
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> ViTOutput:
    c = self.config
    x = ViTEmbeddings(c, self.dtype, name="embeddings")(pixel_values, interpolate_pos_encoding)
    states = ViTEncoder(c, self.dtype, self.attention_impl, self.remat, name="encoder")(x)
    last = layer_norm(c.layer_norm_eps, dtype=self.dtype, name="layernorm")(states[-1])
    pooled = None
    if self.add_pooling_layer:
      pooled = _Dense(c.pooler_output_size, (EMBED, MLP), c.pooler_act, self.dtype,
                      name="pooler")(last[:, 0])
    return ViTOutput(last_hidden_state=last, hidden_states=states, pooled=pooled)


# transformers 5's module names (what `ViTModel().state_dict()` holds) -> the checkpoint names.
_V5_RENAME = tuple((rf"^layers\.(\d+)\.{new}\.", rf"encoder.layer.\1.{old}.") for new, old in (
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
    ("(layernorm_before|layernorm_after)", r"\2")))


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: ViTConfig | str, *,
                           where: str, add_pooling_layer: bool, prefix: str = "") -> dict:
  """A ViT state dict (PyTorch keys and layout) -> float32 numpy params of
  `ViTModel(config, add_pooling_layer=add_pooling_layer)`.

  Only keys under `prefix` are read ("vit." for ViTForImageClassification or the RAHF
  checkpoint), so heads and other towers are skipped; under it every key must have a place.
  Without a pooler, pooler keys are skipped; with one, they must be there. `where` names the
  source in errors.
  """
  config = PRESETS[config] if isinstance(config, str) else config
  p = re.escape(prefix)
  has_pooler = any(k.startswith(prefix + "pooler.") for k in state_dict)
  if add_pooling_layer and not has_pooler:
    raise convert.CheckpointError(
        f"{where} holds no pooler weights ({prefix}pooler.dense.*), but add_pooling_layer=True; "
        "folders saved from ViTForImageClassification have none: build without the pooler")
  # The masked-image-modeling token (ViTForMaskedImageModeling) takes no part in encoding.
  ignore = [rf"^{p}embeddings\.mask_token$"] + ([rf"^(?!{p})"] if prefix else [])
  if not add_pooling_layer:
    ignore.append(rf"^{p}pooler\.")
  module = ViTModel(config, add_pooling_layer=add_pooling_layer)
  abstract = convert.abstract_params(
      module, jnp.zeros((1, *config.image_size, config.num_channels), jnp.float32))
  return convert.to_params(state_dict, abstract, where=where, ignore=ignore,
                           rename=[(rf"^{p}", ""), *_V5_RENAME])


def load(folder: str, *, dtype="float32", remat: bool = False,
         add_pooling_layer: bool | None = None,
         attention_impl: str = "auto") -> tuple[ViTModel, dict]:
  """A transformers ViT folder (config.json + model.safetensors, from ViTModel or a
  ViTFor* head class) -> (ViTModel, float32 numpy params); `dtype` is the compute dtype.

  `add_pooling_layer=None` builds the pooler iff the file holds one; False skips its weights.
  """
  raw = convert.read_config(folder)  # before the weights: a wrong folder fails at once
  where = os.path.join(folder, "config.json")
  if raw.get("model_type") != "vit":
    raise convert.CheckpointError(
        f"{where} has model_type {raw.get('model_type')!r}; expected 'vit' (a transformers "
        "ViTModel or ViTForImageClassification folder)")
  try:
    config = ViTConfig.from_dict(raw)
  except (TypeError, ValueError) as e:
    raise convert.CheckpointError(f"{where}: not a usable ViT config: {e}") from e
  state_dict = convert.read_state_dict(convert.find_weights(folder))
  prefix = "vit." if any(k.startswith("vit.") for k in state_dict) else ""
  if add_pooling_layer is None:
    add_pooling_layer = any(k.startswith(prefix + "pooler.") for k in state_dict)
  params = params_from_state_dict(state_dict, config, where=folder, prefix=prefix,
                                  add_pooling_layer=add_pooling_layer)
  module = ViTModel(config, dtype=jnp.dtype(dtype), remat=remat,
                    add_pooling_layer=add_pooling_layer, attention_impl=attention_impl)
  return module, params


PREPROCESSOR_FILE = "preprocessor_config.json"


def read_preprocessor(folder: str, config: ViTConfig
                      ) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
  """((height, width), mean, std) to feed this ViT images in [0, 1]: resize to (height, width),
  then (x - mean) / std per channel, which equals transformers' ViTImageProcessor on the uint8
  image 255·x (its rescale_factor and do_rescale / do_normalize are folded into mean and std).
  Without PREPROCESSOR_FILE: config.image_size and mean = std = 0.5, as google's ViTs.
  """
  if not os.path.isdir(folder):
    raise convert.CheckpointError(f"model folder not found: {folder!r}")
  path = os.path.join(folder, PREPROCESSOR_FILE)
  n = config.num_channels
  if not os.path.isfile(path):
    return config.image_size, (0.5,) * n, (0.5,) * n
  try:
    with open(path) as f:
      d = json.load(f)
    size = d.get("size", config.image_size)
    # Older (ViTFeatureExtractor) files give one int for a square size, as google's ViTs do.
    size = (size["height"], size["width"]) if isinstance(size, dict) else (
        (size, size) if isinstance(size, int) else size)
    size = tuple(int(x) for x in size)
    # A single number stands for every channel, as transformers reads it.
    channels = lambda v: tuple(float(x) for x in ([v] * n if isinstance(v, (int, float)) else v))
    mean, std = (0.0,) * n, (1.0,) * n
    if d.get("do_normalize", True):
      mean, std = channels(d.get("image_mean", 0.5)), channels(d.get("image_std", 0.5))
    scale = 255.0 * (float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0)
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise convert.CheckpointError(
        f"{path}: not a ViTImageProcessor config ({type(e).__name__}: {e}); expected JSON with "
        '"size": {"height": H, "width": W}, "image_mean" / "image_std" lists') from e
  if (len(size) != 2 or min(size) <= 0 or len(mean) != n or len(std) != n or 0.0 in std
      or scale <= 0):
    raise convert.CheckpointError(
        f"{path}: size {size}, image_mean {list(mean)}, image_std {list(std)}, rescale_factor "
        f"{scale / 255} do not fit a {n}-channel ViT (need (height, width) > 0, {n} means, "
        f"{n} non-zero stds)")
  return size, tuple(m / scale for m in mean), tuple(s / scale for s in std)
