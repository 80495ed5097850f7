"""AutoencoderKL (the Stable Diffusion VAE) in Flax linen, NHWC, matching diffusers' PyTorch model.

Submodules carry the names of diffusers' modules (`encoder/down_blocks_0/resnets_1/conv1`,
`decoder/mid_block/attentions_0/to_q`, ...), so `fnf_jax.models.convert.to_params` maps a
diffusers `vae/` folder onto this module without a per-layer table. The resnets and resamplers
are the UNet's (`fnf_jax.models.blocks`), without a time embedding.

Latent scaling. The UNet works on scaled latents; the VAE itself does not scale:

    latents_for_unet = (mean_or_sample - shift_factor) * scaling_factor     # `to_latents`
    decoder_input    = latents_for_unet / scaling_factor + shift_factor     # `from_latents`

with `shift_factor` taken as 0 when the config has none (SD 1.x / 2.x / XL).

`force_upcast` (true for the SD and SDXL VAEs) is kept on the config for the pipeline: diffusers
runs such a VAE in float32 when the rest of the model is float16 because its activations
overflow float16. bfloat16 has float32's range, so it is an accuracy rather than an overflow
question there; the pipeline chooses the VAE's dtype.
"""

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.models import convert
from fnf_jax.models import layers
from fnf_jax.models.attention import attention
from fnf_jax.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any

SUPPORTED_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_UP_BLOCKS = ("UpDecoderBlock2D",)
SUPPORTED_ACTIVATIONS = ("silu", "swish")  # diffusers' get_activation treats them as the same.
SUPPORTED_CLASSES = ("AutoencoderKL",)
_EPS = 1e-6  # diffusers hard-codes this epsilon for every norm of the VAE.
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar to this.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' AutoencoderKL config.json that the architecture depends on."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    n = len(self.block_out_channels)
    if n == 0:
      raise ValueError("block_out_channels must name at least one block")
    for name, kinds, supported in (
        ("down_block_types", self.down_block_types, SUPPORTED_DOWN_BLOCKS),
        ("up_block_types", self.up_block_types, SUPPORTED_UP_BLOCKS)):
      bad = [k for k in kinds if k not in supported]
      if bad:
        raise ValueError(f"unsupported {name} {bad}: fnf_jax's AutoencoderKL supports only "
                         f"{supported}")
      if len(kinds) != n:
        raise ValueError(f"{name} has {len(kinds)} entries but block_out_channels has {n}")
    if self.act_fn not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"unsupported act_fn {self.act_fn!r}: supported are {SUPPORTED_ACTIVATIONS}")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide the block "
                         f"width {c} (block_out_channels={self.block_out_channels})")
    if self.layers_per_block < 1:
      raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side: 2 ** (number of blocks - 1) (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """From diffusers' vae/config.json; keys starting with '_' and unknown keys are ignored."""
    class_name = d.get("_class_name")
    if class_name is not None and class_name not in SUPPORTED_CLASSES:
      raise ValueError(f"unsupported VAE class {class_name!r}: supported are {SUPPORTED_CLASSES}")
    for key in ("latents_mean", "latents_std"):
      if d.get(key) is not None:
        raise ValueError(f"unsupported VAE config field {key}={d[key]!r}: only null is supported "
                         "(per-channel latent normalisation is not implemented)")
    norm_type = d.get("norm_type", "group")
    if norm_type != "group":
      raise ValueError(f"unsupported norm_type {norm_type!r}: supported are ('group',)")
    kwargs = {}
    for field in dataclasses.fields(cls):
      value = d.get(field.name)
      if value is None:  # absent or null: diffusers' default (shift_factor's default is None).
        continue
      kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def to_latents(mean_or_sample: jax.Array, config: VAEConfig) -> jax.Array:
  """Encoder output -> what the UNet denoises: (x - shift_factor) * scaling_factor."""
  shift = config.shift_factor or 0.0
  return (mean_or_sample - shift) * config.scaling_factor


def from_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
  """UNet-space latents -> decoder input: latents / scaling_factor + shift_factor."""
  shift = config.shift_factor or 0.0
  return latents / config.scaling_factor + shift


def sample_posterior(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """A draw from the diagonal Gaussian N(mean, exp(logvar)) (diffusers' latent_dist.sample())."""
  noise = jax.random.normal(rng, mean.shape, mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * noise


class Attention(nn.Module):
  """diffusers' Attention as the VAE mid-block uses it: pre-GroupNorm, self-attention over all
  pixels, output projection, residual connection (rescale_output_factor is 1)."""

  groups: int
  heads: int
  dtype: Dtype
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = layers.group_norm(self.groups, _EPS, dtype=self.dtype, name="group_norm")(x)
    y = y.reshape(b, h * w, c)
    head_dim = c // self.heads
    q, k, v = (layers.dense(c, dtype=self.dtype, name=n)(y).reshape(b, h * w, self.heads, head_dim)
               for n in ("to_q", "to_k", "to_v"))
    # Logits and softmax run in float32 inside jax.nn.dot_product_attention (upcast_softmax).
    y = attention(q, k, v, implementation=self.attention_impl).reshape(b, h * w, c)
    y = layers.dense(c, (layers.MLP, layers.EMBED), dtype=self.dtype, name="to_out_0")(y)
    return x + y.reshape(b, h, w, c)


class UNetMidBlock2D(nn.Module):
  """resnet, then (attention, resnet) once: the bottleneck of both encoder and decoder."""

  groups: int
  add_attention: bool
  dtype: Dtype
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, _EPS, dtype=self.dtype, name="resnets_0")(x)
    if self.add_attention:
      # AutoencoderKL passes attention_head_dim = channels: a single head.
      x = Attention(self.groups, 1, self.dtype, self.attention_impl, name="attentions_0")(x)
    return ResnetBlock2D(c, self.groups, _EPS, dtype=self.dtype, name="resnets_1")(x)


class ResnetStack(nn.Module):
  """`num_layers` resnets, then a downsampler (DownEncoderBlock2D), an upsampler
  (UpDecoderBlock2D) or neither (each side's last block): `resample` is "down", "up" or None."""
  out_channels: int
  num_layers: int
  groups: int
  resample: str | None
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, _EPS, dtype=self.dtype,
                        name=f"resnets_{i}")(x)
    if self.resample == "down":
      # diffusers builds the VAE's with padding=0: pad bottom/right, then a VALID stride-2 conv.
      x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


def _maybe_remat(cls, remat: bool):
  # nn.remat keeps the module's name and parameters; only the backward pass changes.
  return nn.remat(cls) if remat else cls


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Dtype
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    g = cfg.norm_num_groups
    channels = cfg.block_out_channels
    x = layers.conv(channels[0], 3, dtype=self.dtype, name="conv_in")(x)
    block = _maybe_remat(ResnetStack, self.remat)
    for i, c in enumerate(channels):
      x = block(c, cfg.layers_per_block, g, "down" if i < len(channels) - 1 else None,
                self.dtype, name=f"down_blocks_{i}")(x)
    x = _maybe_remat(UNetMidBlock2D, self.remat)(
        g, cfg.mid_block_add_attention, self.dtype, self.attention_impl, name="mid_block")(x)
    x = nn.silu(layers.group_norm(g, _EPS, dtype=self.dtype, name="conv_norm_out")(x))
    return layers.conv(2 * cfg.latent_channels, 3, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Dtype
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    g = cfg.norm_num_groups
    channels = tuple(reversed(cfg.block_out_channels))
    x = layers.conv(channels[0], 3, dtype=self.dtype, name="conv_in")(z)
    x = _maybe_remat(UNetMidBlock2D, self.remat)(
        g, cfg.mid_block_add_attention, self.dtype, self.attention_impl, name="mid_block")(x)
    block = _maybe_remat(ResnetStack, self.remat)
    for i, c in enumerate(channels):
      # The decoder has one more resnet per block than the encoder, as in diffusers.
      x = block(c, cfg.layers_per_block + 1, g, "up" if i < len(channels) - 1 else None,
                self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(layers.group_norm(g, _EPS, dtype=self.dtype, name="conv_norm_out")(x))
    return layers.conv(cfg.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder of latent diffusion, NHWC.

  init creates float32 params (`load` returns them in `dtype` when that is half precision);
  activations run in `dtype`; encode/decode return float32. `remat` rematerialises each block in
  the backward pass, for reward gradients through the decoder at full resolution.
  """

  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.attention_impl, self.remat)
    self.decoder = Decoder(cfg, self.dtype, self.attention_impl, self.remat)
    self.quant_conv = (layers.conv(2 * cfg.latent_channels, 1, dtype=self.dtype)
                       if cfg.use_quant_conv else None)
    self.post_quant_conv = (layers.conv(cfg.latent_channels, 1, dtype=self.dtype)
                            if cfg.use_post_quant_conv else None)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent]."""
    h = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, latent] (see `from_latents`) -> images, roughly in [-1, 1]."""
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean (diffusers' forward, sample_posterior=False)."""
    mean, _ = self.encode(images)
    return self.decode(mean)


# Older diffusers checkpoints name the mid-block attention projections differently.
LEGACY_ATTENTION_RENAMES = (
    (r"(mid_block\.attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(mid_block\.attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(mid_block\.attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(mid_block\.attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
)
_ATTENTION_WEIGHT = (r"mid_block\.attentions\.\d+\."
                     r"(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.weight$")


def squeeze_conv_attention(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Some old checkpoints hold the mid-block attention projections as 1x1 convs [C, C, 1, 1];
  they are Linear layers [C, C] with the kernel dims squeezed out."""
  pattern = re.compile(_ATTENTION_WEIGHT)
  out = dict(state_dict)
  for key, value in state_dict.items():
    if pattern.search(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
      out[key] = value[:, :, 0, 0]
  return out


def dummy_images(config: VAEConfig) -> jax.Array:
  """The smallest input `init` accepts: one latent pixel."""
  side = config.downsample_factor
  return jnp.zeros((1, side, side, config.in_channels), jnp.float32)


def params_from_state_dict(module: AutoencoderKL, state_dict: Mapping[str, np.ndarray], *,
                           where: str, dtype=np.float32) -> dict:
  """A diffusers AutoencoderKL state dict (current or legacy attention names) -> Flax params."""
  abstract = convert.abstract_params(module, dummy_images(module.config))
  return convert.to_params(squeeze_conv_attention(state_dict), abstract, where=where,
                           rename=LEGACY_ATTENTION_RENAMES, dtype=dtype)


def load(folder: str, *, dtype="float32", attention_impl: str = "auto",
         remat: bool = False) -> tuple[AutoencoderKL, dict]:
  """(module, params) from a diffusers `vae/` folder (config.json + *.safetensors).

  `dtype` (a name or a jnp dtype) is the compute dtype. Params are jax arrays on the default
  device, float32, or in `dtype` when that is half precision (bfloat16 / float16): halving their
  memory, as the VAE is frozen during reward fine-tuning.
  """
  dtype = jnp.dtype(dtype)
  config_dict, state_dict = convert.read_component(folder)
  module = AutoencoderKL(VAEConfig.from_dict(config_dict), dtype=dtype,
                         attention_impl=attention_impl, remat=remat)
  param_dtype = np.float32 if dtype.itemsize >= 4 else dtype
  params = params_from_state_dict(module, state_dict, where=folder, dtype=param_dtype)
  return module, jax.tree.map(jnp.asarray, params)
