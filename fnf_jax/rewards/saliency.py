"""Saliency heatmaps for scalar rewards: where in the image the reward's evidence lies.

Both methods explain a *target*: a per-image scalar that grows with what is wrong with the image
(a reward's pre-squashing "problem" score: the unsafe log-odds, minus the rating, ...). Using the
logit rather than the probability keeps the gradients alive where a softmax saturates; the
per-image normalisation below makes the heatmap independent of the target's scale anyway.

  gradxinput  |d target / d image  *  (image - baseline)|, summed over channels: [B, H, W].
              Works for any differentiable target of the pixels.
  gradcam     Grad-CAM on the ViT patch tokens of one CLIP vision layer: channel weights =
              mean over patches of d target / d tokens, cam = relu(sum_c w_c A_c) per patch,
              reshaped to the patch grid (row-major, as CLIP orders patches), smoothed with a
              small Gaussian, upsampled bilinearly to the image.

Both return heatmaps in [0, 1] (divided by each image's maximum), are pure and jittable, and
are used by the CLIP rewards through `heatmap_fn(cfg, ...)` (config field `saliency`).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fnf_jax.config import choices
from fnf_jax.rewards import masks

METHODS = choices.SALIENCY_METHODS
# target(params, images, prompt_ids) -> [B]; per image, so d(sum)/d(image_b) = d(target_b)/...
TargetFn = Callable[[Any, jax.Array, Any], jax.Array]
# head(params, image_embeds [B, P], prompt_ids) -> [B]: a target given CLIP's image embedding.
HeadFn = Callable[[Any, jax.Array, Any], jax.Array]


def normalize(heat: jax.Array) -> jax.Array:
  """Per-image division by the maximum: [B, H, W] in [0, 1]; all-zero stays all-zero."""
  peak = jnp.max(heat, axis=(1, 2), keepdims=True)
  return heat / jnp.maximum(peak, jnp.finfo(heat.dtype).tiny)


def grad_x_input(target: TargetFn, params, images: jax.Array, prompt_ids,
                 baseline: float = 0.0) -> jax.Array:
  """Gradient x input (relative to a constant `baseline` image): [B, H, W] in [0, 1]."""
  images = images.astype(jnp.float32)
  grads = jax.grad(lambda x: jnp.sum(target(params, x, prompt_ids)))(images)
  return normalize(jnp.sum(jnp.abs(grads * (images - baseline)), axis=-1))


def _layer_index(layer: int, num_layers: int) -> int:
  """`layer` indexes VisionOutput.hidden_states (0 = embeddings, i = output of layer i)."""
  index = layer % (num_layers + 1)
  if not 1 <= index <= num_layers:
    raise ValueError(
        f"gradcam_layer={layer} selects the embeddings; pick a layer output (1..{num_layers}, "
        f"or negative from the end; -2, the default, is the last layer's input)")
  return index


def _to_image(cam: jax.Array, size: tuple[int, int], sigma: float) -> jax.Array:
  """Patch-grid cam [B, g, g] -> [B, H, W]: blur, upsample to CLIP's centre crop, pad."""
  cam = masks.blur(normalize(cam), sigma)  # in [0, 1] here, so blur's clipping is a no-op
  h, w = size
  s = min(h, w)  # preprocess_images centre-crops to s x s before resizing: the cam covers that
  cam = jax.image.resize(cam, (cam.shape[0], s, s), "bilinear")
  top, left = (h - s) // 2, (w - s) // 2
  return jnp.pad(cam, ((0, 0), (top, h - s - top), (left, w - s - left)))


def grad_cam(clip, head: HeadFn, params, images: jax.Array, prompt_ids, *, layer: int = -2,
             sigma: float = 1.0) -> jax.Array:
  """Grad-CAM of `head(params, clip image embeds, ids)` on a CLIP vision layer: [B, H, W].

  `params["clip"]` are the CLIP's params. The default layer (-2, the penultimate layer's output)
  is the input of the last block: the last block's own patch outputs never reach the pooled
  class token, so their gradient is zero. `sigma` (Gaussian, in patches) smooths the grid.
  """
  vision = clip.config.vision_config
  index = _layer_index(layer, vision.num_hidden_layers)
  key = f"hidden_states_{index}"

  def total(perturbations):
    out = clip.vision_outputs(params["clip"], images, perturbations)
    return jnp.sum(head(params, out.image_embeds, prompt_ids)), out.hidden_states[index]

  grads, acts = jax.grad(total, has_aux=True)(clip.vision_perturbations(images.shape[0]))
  grads = grads["vision_model"]["encoder"][key][:, 1:].astype(jnp.float32)  # patches only
  acts = acts[:, 1:].astype(jnp.float32)
  weights = jnp.mean(grads, axis=1, keepdims=True)  # [B, 1, D]
  cam = jax.nn.relu(jnp.sum(weights * acts, axis=-1))  # [B, N]
  grid = vision.image_size // vision.patch_size
  cam = cam.reshape(cam.shape[0], grid, grid)  # row-major patch order
  return normalize(_to_image(cam, images.shape[1:3], sigma))


def heatmap_fn(cfg, clip, head: HeadFn):
  """heatmap(params, images, prompt_ids) -> [B, H, W] by the method that cfg.saliency names.

  Config fields: saliency (a METHODS name), gradcam_layer, gradcam_sigma (in patches),
  saliency_baseline (for gradxinput).
  """
  method = cfg.saliency
  if method not in METHODS:
    raise ValueError(f"reward.saliency={method!r} is not one of {METHODS}")
  if method == "gradcam":
    layer = int(cfg.gradcam_layer)
    _layer_index(layer, clip.config.vision_config.num_hidden_layers)  # fail at build time
    sigma = float(cfg.gradcam_sigma)
    return lambda params, images, ids: grad_cam(clip, head, params, images, ids, layer=layer,
                                                sigma=sigma)
  baseline = float(cfg.saliency_baseline)

  def target(params, images, ids):
    return head(params, clip.image_features(params["clip"], images), ids)

  return lambda params, images, ids: grad_x_input(target, params, images, ids, baseline)
