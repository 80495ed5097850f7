"""Stable Diffusion's UNet2DConditionModel (SD 1.x, 2.x, XL) in Flax linen, NHWC.

Reproduces diffusers' PyTorch `UNet2DConditionModel` number for number (float32) and loads its
`unet/` folders directly: `module, params = load("path/to/unet")`, then
`module.apply({"params": params}, sample, timesteps, encoder_hidden_states, added_cond)`.
The blocks live in `fnf_jax.models.unet_blocks` (the resnets and resamplers, shared with the
VAE, in `fnf_jax.models.blocks`).
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.models import convert
from fnf_jax.models import layers
from fnf_jax.models import unet_blocks as blocks

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
ADDITION_EMBED_TYPES = (None, "text_time")
ACTIVATIONS = ("silu", "swish")

# diffusers config keys whose non-default values select modules we do not implement:
# key -> the values we accept.
_ONLY_DEFAULTS = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# Keys that only configure blocks we do not implement (rejected through their block type) or
# training-time dropout (this module is deterministic).
_IGNORED = ("resnet_skip_time_act", "resnet_out_scale_factor", "mid_block_only_cross_attention",
            "addition_embed_type_num_heads", "dropout")


def _tuples(value):
  """JSON lists -> tuples, recursively, so that the frozen config stays hashable."""
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _check(name: str, value, supported) -> None:
  if value not in supported:
    raise ValueError(f"unsupported UNet {name}={value!r}: fnf_jax's UNet supports {name} in "
                     f"{list(supported)}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """diffusers' unet/config.json, restricted to what SD 1.x / 2.x / XL use.

  Field names and defaults are diffusers'. Per-block fields take an int (every block) or one
  value per down block; the up blocks use them reversed.
  """
  sample_size: int | tuple[int, int] | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = (
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = (
      "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int | None = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  # An int, one int per block, or (asymmetric UNets) one tuple per block with one depth per
  # resnet; the latter needs `reverse_transformer_layers_per_block` for the up blocks.
  transformer_layers_per_block: int | tuple = 1
  reverse_transformer_layers_per_block: tuple | None = None
  # diffusers' historic naming: when num_attention_heads is None (most checkpoints),
  # `attention_head_dim` is the NUMBER OF HEADS. The head size is then channels // heads.
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  resnet_time_scale_shift: str = "default"
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  timestep_post_act: str | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
    """From diffusers' config.json; rejects what we do not implement, ignores bookkeeping keys."""
    for key, supported in _ONLY_DEFAULTS.items():
      if key in d:
        _check(key, d[key], supported)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _tuples(v) for k, v in d.items() if k in names})

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _tuples(getattr(self, f.name)))
    n = len(self.down_block_types)
    for t in self.down_block_types:
      _check("down_block_types entry", t, DOWN_BLOCK_TYPES)
    for t in self.up_block_types:
      _check("up_block_types entry", t, UP_BLOCK_TYPES)
    _check("mid_block_type", self.mid_block_type, MID_BLOCK_TYPES)
    _check("addition_embed_type", self.addition_embed_type, ADDITION_EMBED_TYPES)
    _check("resnet_time_scale_shift", self.resnet_time_scale_shift, ("default",))
    _check("act_fn", self.act_fn, ACTIVATIONS)
    _check("time_embedding_act_fn", self.time_embedding_act_fn, (None,) + ACTIVATIONS)
    _check("timestep_post_act", self.timestep_post_act, (None,) + ACTIVATIONS)
    if any(self._per_block(self.only_cross_attention)):
      _check("only_cross_attention", self.only_cross_attention, (False,))
    if self.norm_num_groups is None:
      _check("norm_num_groups", None, ("an int dividing every block_out_channels",))
    if len(self.up_block_types) != n or len(self.block_out_channels) != n:
      raise ValueError(f"down_block_types {self.down_block_types}, up_block_types "
                       f"{self.up_block_types} and block_out_channels {self.block_out_channels} "
                       "must have the same length")
    for name in ("layers_per_block", "cross_attention_dim", "attention_head_dim",
                 "num_attention_heads", "transformer_layers_per_block"):
      value = getattr(self, name)
      if isinstance(value, tuple) and len(value) != n:
        raise ValueError(f"{name}={value} needs one entry per block ({n})")
    if len(set(self.cross_attention_dims)) != 1:
      raise ValueError(f"cross_attention_dim={self.cross_attention_dim}: every block attends to "
                       "the same encoder_hidden_states, so one width is supported")
    if (any(isinstance(t, tuple) for t in self._per_block(self.transformer_layers_per_block))
        and self.reverse_transformer_layers_per_block is None):
      raise ValueError("per-layer transformer_layers_per_block needs "
                       "reverse_transformer_layers_per_block (as in diffusers)")
    if self.addition_embed_type == "text_time" and (
        self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
      raise ValueError('addition_embed_type="text_time" needs addition_time_embed_dim and '
                       "projection_class_embeddings_input_dim")

  def _per_block(self, value) -> tuple:
    return value if isinstance(value, tuple) else (value,) * len(self.down_block_types)

  @property
  def layers(self) -> tuple[int, ...]:
    return self._per_block(self.layers_per_block)

  @property
  def heads(self) -> tuple[int, ...]:
    """Attention heads per down block (the quirk explained at `attention_head_dim`)."""
    heads = self.num_attention_heads
    return self._per_block(self.attention_head_dim if heads is None else heads)

  @property
  def cross_attention_dims(self) -> tuple[int, ...]:
    return self._per_block(self.cross_attention_dim)

  def transformer_depths(self, up: bool) -> tuple[tuple[int, ...], ...]:
    """Transformer depth after each resnet, per down block (up=False) or up block (up=True)."""
    if up and self.reverse_transformer_layers_per_block is not None:
      per_block, layers = self.reverse_transformer_layers_per_block, self.layers[::-1]
      extra = 1
    else:
      per_block = self._per_block(self.transformer_layers_per_block)
      layers, extra = self.layers, 0
      if up:
        per_block, layers, extra = per_block[::-1], layers[::-1], 1
    return tuple(d if isinstance(d, tuple) else (d,) * (n + extra)
                 for d, n in zip(per_block, layers))

  @property
  def mid_transformer_depth(self) -> int:
    last = self._per_block(self.transformer_layers_per_block)[-1]
    return last[0] if isinstance(last, tuple) else last

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]


class UNet2DConditionModel(nn.Module):
  """diffusers' UNet2DConditionModel: sample [B, h, w, C] -> prediction [B, h, w, out_channels].

  init creates float32 params (`load(dtype="bfloat16")` returns bfloat16 ones); `dtype` is the
  compute dtype. The timestep (and SDXL's added condition) embedding is computed in float32: it
  is tiny and feeds every resnet.
  """
  config: UNetConfig
  dtype: layers.Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False  # recompute each resnet / transformer block in the backward pass

  def _block_kwargs(self, i: int, up: bool) -> dict:
    cfg = self.config
    rev = (lambda t: t[::-1]) if up else (lambda t: t)
    crossattn = (cfg.up_block_types if up else cfg.down_block_types)[i].startswith("CrossAttn")
    return dict(
        out_channels=rev(cfg.block_out_channels)[i],
        num_layers=rev(cfg.layers)[i] + (1 if up else 0),
        transformer_layers=cfg.transformer_depths(up)[i] if crossattn else (),
        heads=rev(cfg.heads)[i], groups=cfg.norm_num_groups, eps=cfg.norm_eps,
        use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention,
        attention_impl=self.attention_impl, dtype=self.dtype, remat=self.remat)

  def _embed_time(self, timesteps, batch: int, added_cond) -> jax.Array:
    cfg = self.config
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t = blocks.timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift)
    emb = blocks.TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, cfg.timestep_post_act,
                                   name="time_embedding")(t)
    if cfg.addition_embed_type == "text_time":
      missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond or {})]
      if missing:
        raise ValueError(f'addition_embed_type="text_time" (SDXL) needs added_cond with '
                         f"{missing}: text_embeds [B, P] and time_ids [B, n]")
      text, ids = added_cond["text_embeds"], jnp.asarray(added_cond["time_ids"])
      ids = blocks.timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim,
                                      flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
      add = jnp.concatenate([jnp.asarray(text, jnp.float32), ids.reshape(text.shape[0], -1)], -1)
      if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
        raise ValueError(f"text_embeds width + time_ids count * addition_time_embed_dim = "
                         f"{add.shape[-1]}, but projection_class_embeddings_input_dim is "
                         f"{cfg.projection_class_embeddings_input_dim}")
      emb = emb + blocks.TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn,
                                           name="add_embedding")(add)
    return blocks.activation(cfg.time_embedding_act_fn)(emb)

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond=None):
    cfg = self.config
    if encoder_hidden_states.shape[-1] != cfg.cross_attention_dims[0]:
      raise ValueError(f"encoder_hidden_states has width {encoder_hidden_states.shape[-1]}, "
                       f"the UNet's cross_attention_dim is {cfg.cross_attention_dims[0]}")
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    temb = self._embed_time(timesteps, sample.shape[0], added_cond)
    context = blocks.constrain(encoder_hidden_states.astype(self.dtype))

    x = layers.conv(cfg.block_out_channels[0], cfg.conv_in_kernel, dtype=self.dtype,
                    name="conv_in")(sample)
    skips = [blocks.constrain(x)]
    n = len(cfg.down_block_types)
    for i in range(n):
      x, res = blocks.DownBlock(**self._block_kwargs(i, up=False), add_downsample=i < n - 1,
                                downsample_padding=cfg.downsample_padding,
                                name=f"down_blocks_{i}")(x, temb, context)
      x = blocks.constrain(x)
      skips += [blocks.constrain(r) for r in res]

    if cfg.mid_block_type is not None:
      kw = self._block_kwargs(n - 1, up=False)
      kw.update(num_layers=1, transformer_layers=(cfg.mid_transformer_depth,))
      x = blocks.MidBlock(**kw, output_scale_factor=cfg.mid_block_scale_factor,
                          name="mid_block")(x, temb, context)
      x = blocks.constrain(x)

    # Latents that are not a multiple of 2**(n-1) upsample to the skip connection's size.
    odd_size = any(d % 2 ** (n - 1) for d in sample.shape[1:3])
    for i in range(n):
      kw = self._block_kwargs(i, up=True)
      res, skips = skips[-kw["num_layers"]:], skips[:-kw["num_layers"]]
      size = skips[-1].shape[1:3] if odd_size and i < n - 1 else None
      x = blocks.UpBlock(**kw, add_upsample=i < n - 1, name=f"up_blocks_{i}")(
          x, res, temb, context, size)
      x = blocks.constrain(x)

    x = layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype,
                          name="conv_norm_out")(x)
    return layers.conv(cfg.out_channels, cfg.conv_out_kernel, dtype=self.dtype,
                       name="conv_out")(nn.silu(x))


def dummy_inputs(config: UNetConfig, batch: int = 1, size: int | None = None,
                 context_length: int = 1) -> tuple:
  """(sample, timesteps, encoder_hidden_states, added_cond) of the right shapes, all zeros."""
  size = size or 2 ** (len(config.down_block_types) - 1)
  sample = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
  context = jnp.zeros((batch, context_length, config.cross_attention_dims[0]), jnp.float32)
  added_cond = None
  if config.addition_embed_type == "text_time":
    # SDXL passes 6 time ids (5 for the refiner); only the total width reaches a weight.
    ids = 6 if config.projection_class_embeddings_input_dim > 6 * config.addition_time_embed_dim else 1
    text = config.projection_class_embeddings_input_dim - ids * config.addition_time_embed_dim
    added_cond = {"text_embeds": jnp.zeros((batch, text), jnp.float32),
                  "time_ids": jnp.zeros((batch, ids), jnp.float32)}
  return sample, jnp.zeros((batch,), jnp.float32), context, added_cond


def _compute_dtype(dtype):
  if isinstance(dtype, str):
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype {dtype!r} is not one of 'float32', 'bfloat16'")
    return jnp.dtype(dtype)
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"dtype {dtype} is not one of float32, bfloat16")
  return dtype


def load(folder: str, *, dtype="float32", attention_impl: str = "auto", remat: bool = False
         ) -> tuple[UNet2DConditionModel, dict]:
  """(module, params) from a diffusers `unet/` folder (config.json + *.safetensors).

  Params are host numpy arrays (float32, or bfloat16 when dtype is bfloat16) in the module's
  tree; place or shard them as needed. The config is checked before the weights are read.
  """
  dtype = _compute_dtype(dtype)
  config = UNetConfig.from_dict(convert.read_config(folder))
  module = UNet2DConditionModel(config, dtype=dtype, attention_impl=attention_impl, remat=remat)
  state = convert.read_state_dict(convert.find_weights(folder))
  abstract = convert.abstract_params(module, *dummy_inputs(config))
  params = convert.to_params(state, abstract, where=folder, dtype=np.dtype(dtype))
  return module, params
