"""Convolutional blocks shared by the UNet and the VAE, NHWC (in diffusers too, one
`ResnetBlock2D` / `Downsample2D` / `Upsample2D` serves both): one definition keeps the two ports
from drifting apart. Submodules keep diffusers' names (`norm1`, `time_emb_proj`,
`conv_shortcut`, `conv`), which is what `fnf_jax.models.convert` maps checkpoints onto.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.models import layers

Dtype = layers.Dtype


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice plus a (1x1-projected when widths differ) skip.

  With `temb` (the UNet's), its projection is added between the two convs ("default" shift);
  the VAE's blocks take none and so have no `time_emb_proj`.
  """
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.silu(layers.group_norm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
    h = layers.conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
    if temb is not None:
      t = layers.dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(layers.group_norm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
    h = layers.conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
    out = x + h
    return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv; padding 0 means PyTorch's asymmetric (0, 1) pad, as in diffusers.

  diffusers' padding=0 (the VAE's) zero-pads one row/column at the bottom/right only, so the
  sampling grid is not centred as with padding=1 (the UNet's default).
  """
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return layers.conv(self.out_channels, 3, stride=2, padding=self.padding, dtype=self.dtype,
                       name="conv")(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """PyTorch's F.interpolate(mode="nearest") on NHWC: source index floor(dst * in / out)."""
  h, w = x.shape[1:3]
  if tuple(size) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.minimum(np.floor(np.arange(size[0]) * np.float32(h / size[0])).astype(int), h - 1)
  cols = np.minimum(np.floor(np.arange(size[1]) * np.float32(w / size[1])).astype(int), w - 1)
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """Nearest 2x (or to `size`: the UNet's skip connection when the latent is not a multiple),
  then a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size: tuple[int, int] | None = None):
    x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
    return layers.conv(self.out_channels, 3, dtype=self.dtype, name="conv")(x)
