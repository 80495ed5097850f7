"""The analytic judge of the toy world: evaluation only, never a training reward.

It knows the rules of the world (`world.py`: reference colours, upright triangles, a dark
blotch), so it measures what a fine-tuning run changed without a learned model whose own errors
would blur the comparison; the learned reward model is what training optimizes.

    defects(images)    dark blob: max RGB < dark_threshold, an 8-connected component >= min_pixels
    color(images)      majority vote of the saturated pixels' nearest reference colour
    shape(images)      from the largest non-background component: box fill ratio (square ~1) and
                       the width of its upper vs lower half (a triangle is narrow at the top)
    prompt_fidelity    0.5 * [colour right] + 0.5 * [shape right]: 1 both, 0.5 one, 0 none

Images are numpy [B, H, W, 3] in [0, 1]. scipy (a dependency of jax itself) labels components.
Calibrate thresholds on the shipped model's samples as well as on data: samples have softer
edges and lighter blotches than the data.
"""

from typing import Sequence

import numpy as np
from scipy import ndimage

from fnf_jax.toy import world

# Calibrated on data and on the shipped model's samples together: data
# blotches have max RGB <= 0.29, shapes >= 0.6, backgrounds >= 0.82; the model draws them
# lighter and smaller. On 512 data images any threshold in 0.35-0.5 with 4-8 px has recall 1.000
# and no false positives; on 192 samples of the shipped model (20 DDIM steps, no guidance)
# 0.35 / 8 px finds 16% and 0.5 / 6 px 26%, the rate one counts by eye (data: 30%).
DARK_THRESHOLD = 0.5
MIN_DEFECT_PIXELS = 6
COLOR_MIN_BRIGHTNESS = 0.35  # pixels darker than this (blotches) do not vote on the colour
MIN_SHAPE_PIXELS = 20  # data shapes have >= 57 px
SATURATION = 0.3  # max - min channel of a "coloured" pixel (background 0, shapes >= 0.4)
FOREGROUND = 0.2  # max |pixel - background| of a shape pixel
SQUARE_FILL = 0.9  # box fill ratio above which a blob is a square (circle ~0.79)
TRIANGLE_TAPER = 0.65  # width(upper half) / width(lower half) below which it is a triangle
NONE = "none"  # what color/shape return when the image has no coloured pixels / no shape

_EIGHT = np.ones((3, 3), bool)


def _as_images(images) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [B, H, W, 3] in [0, 1], got shape {images.shape}")
  return images


def defects(images, *, dark_threshold: float = DARK_THRESHOLD,
            min_pixels: int = MIN_DEFECT_PIXELS) -> dict:
  """dict(has_defect [B] bool, defect_mask [B, H, W] bool: the dark components >= min_pixels)."""
  images = _as_images(images)
  dark = images.max(axis=-1) < dark_threshold
  masks = np.zeros(dark.shape, bool)
  for i, d in enumerate(dark):
    labels, n = ndimage.label(d, structure=_EIGHT)
    if n:
      sizes = np.bincount(labels.ravel())
      big = np.nonzero(sizes >= min_pixels)[0]
      masks[i] = np.isin(labels, big[big > 0])
  return {"has_defect": masks.any(axis=(1, 2)), "defect_mask": masks}


def color(images, *, saturation: float = SATURATION) -> list[str]:
  """Per image, the reference colour most saturated pixels are nearest to (or NONE)."""
  images = _as_images(images)
  refs = np.asarray([world.REFERENCE_COLORS[c] for c in world.COLORS], np.float32)
  out = []
  for image in images:
    px = image.reshape(-1, 3)
    px = px[(px.max(-1) - px.min(-1) > saturation) & (px.max(-1) >= COLOR_MIN_BRIGHTNESS)]
    if not len(px):
      out.append(NONE)
      continue
    nearest = ((px[:, None] - refs[None]) ** 2).sum(-1).argmin(-1)
    out.append(world.COLORS[np.bincount(nearest, minlength=len(refs)).argmax()])
  return out


def _background(image: np.ndarray) -> np.ndarray:
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  return np.median(border, axis=0)


def shape_features(image: np.ndarray) -> dict | None:
  """fill (area / box area), taper (upper- / lower-half mean width) and area of the largest
  non-background component; None when there is none."""
  fg = np.abs(image - _background(image)).max(-1) > FOREGROUND
  labels, n = ndimage.label(fg, structure=_EIGHT)
  if not n:
    return None
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  blob = labels == sizes.argmax()
  rows, cols = np.nonzero(blob.any(1))[0], np.nonzero(blob.any(0))[0]
  blob = blob[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  widths = blob.sum(1).astype(np.float32)
  half = len(widths) // 2
  upper, lower = widths[:half], widths[len(widths) - half:]
  taper = float(upper.mean() / lower.mean()) if half else 1.0
  return {"fill": float(blob.mean()), "taper": taper, "area": int(blob.sum())}


def shape(images) -> list[str]:
  """Per image, circle / square / triangle of its largest non-background component (or NONE)."""
  out = []
  for image in _as_images(images):
    f = shape_features(image)
    if f is None or f["area"] < MIN_SHAPE_PIXELS:
      out.append(NONE)
    elif f["taper"] < TRIANGLE_TAPER:
      out.append("triangle")
    elif f["fill"] > SQUARE_FILL:
      out.append("square")
    else:
      out.append("circle")
  return out


def parse_caption(caption: str) -> tuple[str, str]:
  """(colour, shape) named in a caption; raises if it names not exactly one of each."""
  words = caption.lower().replace(",", " ").replace(".", " ").split()
  colors = [w for w in words if w in world.COLORS]
  shapes = [w for w in words if w in world.SHAPES]
  if len(colors) != 1 or len(shapes) != 1:
    raise ValueError(f"caption {caption!r} must name one colour of {world.COLORS} and one "
                     f"shape of {world.SHAPES}")
  return colors[0], shapes[0]


def evaluate(images, captions: Sequence[str]) -> dict:
  """Everything the judge says about a batch: per-image arrays (colour_right, shape_right,
  fidelity, has_defect) and the predicted colour / shape names."""
  images = _as_images(images)
  if len(captions) != len(images):
    raise ValueError(f"{len(captions)} captions for {len(images)} images")
  wanted = [parse_caption(c) for c in captions]
  colors, shapes = color(images), shape(images)
  color_right = np.array([c == w[0] for c, w in zip(colors, wanted)])
  shape_right = np.array([s == w[1] for s, w in zip(shapes, wanted)])
  return {"color": colors, "shape": shapes, "color_right": color_right,
          "shape_right": shape_right,
          "fidelity": 0.5 * color_right.astype(np.float32) + 0.5 * shape_right,
          "has_defect": defects(images)["has_defect"]}


def prompt_fidelity(images, captions: Sequence[str]) -> np.ndarray:
  """[B] float32: 0.5 for the right colour plus 0.5 for the right shape."""
  return evaluate(images, captions)["fidelity"]


def build():
  """The judge as the eval job takes it (fnf_jax/evaluation/judges.py, `eval.judge = "toy"`): a problem is
  a blotch; prompt fidelity and its two halves are reported beside the rewards."""
  from fnf_jax.evaluation import judges  # pylint: disable=import-outside-toplevel

  def verdict(images, prompts) -> dict:
    v = evaluate(images, prompts)
    return {"has_defect": v["has_defect"], "prompt_fidelity": v["fidelity"],
            "color_right": v["color_right"], "shape_right": v["shape_right"]}

  return judges.Judge(verdict, problem="has_defect", description=(
      "the toy world's analytic judge (fnf_jax/toy/judge.py: it knows the world's rules and was "
      "never used in training) finds a dark blotch in the image"))
