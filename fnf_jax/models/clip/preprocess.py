"""CLIP's image preprocessing as a differentiable jax function (reward gradients flow through
it), instead of transformers' PIL-based image processor.
"""

import jax
import jax.numpy as jnp

# CLIP's image normalisation (OpenAI's, also used by every OpenCLIP model we support).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


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
