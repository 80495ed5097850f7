"""Heatmap / saliency -> mask M at image resolution (1 = problematic, may change).

    resize (bilinear) -> threshold (absolute value, or a per-image quantile) -> dilate by N px
    -> optional Gaussian blur to a soft mask -> problem gate

The gate (`gate`, config `mask.gate` / `mask.gate_threshold`) empties the mask of an image in
which the reward finds no problem: a quantile threshold alone marks the top share of every
heatmap, so a clean image would get a region to "fix" too. "score": problematic when the
reward's score (higher is better) is below the threshold; "peak": when the heatmap's maximum
reaches it (for heatmaps on an absolute scale: probabilities, colour closeness); "none".

All pure jnp; masks need no gradient (they depend on the reference image only), so callers
wrap them in stop_gradient.
"""

import jax
import jax.numpy as jnp

from fnf_jax.config import choices

THRESHOLD_MODES = choices.THRESHOLD_MODES


def resize(heatmap: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, h, w] -> [B, H, W], bilinear (antialiased when shrinking)."""
  if heatmap.shape[1:] == tuple(size):
    return heatmap
  return jax.image.resize(heatmap, heatmap.shape[:1] + tuple(size), "bilinear")


def threshold(heatmap: jax.Array, value: float, mode: str = "absolute") -> jax.Array:
  """Binary {0, 1} float mask. quantile: keep the top (1 - value) share of each image's pixels."""
  if mode not in THRESHOLD_MODES:
    raise ValueError(f"threshold mode {mode!r} is not one of {THRESHOLD_MODES}")
  if mode == "absolute":
    return (heatmap >= value).astype(jnp.float32)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"a quantile threshold must be in [0, 1], got {value}")
  cut = jnp.quantile(heatmap.reshape(heatmap.shape[0], -1), value, axis=1)[:, None, None]
  # `> 0` keeps an all-zero heatmap (nothing found) from selecting the whole image.
  return ((heatmap >= cut) & (heatmap > 0)).astype(jnp.float32)


def dilate(mask: jax.Array, pixels: int) -> jax.Array:
  """Grows the mask by `pixels` in every direction (square structuring element)."""
  if pixels <= 0:
    return mask
  window = 2 * pixels + 1
  return jax.lax.reduce_window(mask, -jnp.inf, jax.lax.max, (1, window, window), (1, 1, 1),
                               "SAME")


def blur(mask: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur (soft edges); the mask keeps values in [0, 1]."""
  if sigma <= 0:
    return mask
  radius = max(1, int(3 * sigma))
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (x / sigma) ** 2)
  kernel = kernel / kernel.sum()
  padded = jnp.pad(mask, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
  rows = jax.vmap(lambda img: jax.vmap(lambda r: jnp.convolve(r, kernel, "valid"))(img))(padded)
  cols = jax.vmap(lambda img: jax.vmap(lambda c: jnp.convolve(c, kernel, "valid"))(img.T).T)(rows)
  return jnp.clip(cols, 0.0, 1.0)


def from_heatmap(heatmap: jax.Array, size: tuple[int, int], *, threshold_value: float,
                 threshold_mode: str = "absolute", dilation: int = 0,
                 blur_sigma: float = 0.0) -> jax.Array:
  """The whole chain: [B, h, w] heatmap -> [B, H, W] mask in [0, 1]."""
  mask = threshold(resize(heatmap.astype(jnp.float32), size), threshold_value, threshold_mode)
  return blur(dilate(mask, dilation), blur_sigma)


def problematic(heatmap: jax.Array, scores: jax.Array | None, gate: str,
                threshold: float) -> jax.Array:
  """[B] bool: whether the gate lets image b keep its mask (see the module docstring)."""
  if gate not in choices.MASK_GATES:
    raise ValueError(f"mask gate {gate!r} is not one of {choices.MASK_GATES}")
  if gate == "none":
    return jnp.ones(heatmap.shape[:1], bool)
  if gate == "peak":
    return jnp.max(heatmap.reshape(heatmap.shape[0], -1), axis=1) >= threshold
  return scores < threshold


def from_config(heatmap: jax.Array, size: tuple[int, int], cfg,
                scores: jax.Array | None = None) -> jax.Array:
  """`from_heatmap` with settings from a config block (threshold, threshold_mode, dilation, blur),
  then its gate (gate, gate_threshold; `scores` are the reward's, needed by gate "score")."""
  mask = from_heatmap(heatmap, size, threshold_value=cfg.threshold,
                      threshold_mode=cfg.threshold_mode, dilation=cfg.dilation,
                      blur_sigma=cfg.blur)
  keep = problematic(heatmap.astype(jnp.float32), scores, cfg.gate, cfg.gate_threshold)
  return mask * keep[:, None, None].astype(mask.dtype)
