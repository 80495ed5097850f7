"""`toy_defect`: the toy world's learned, localized reward model (what `make demo` fine-tunes on).

A small fully convolutional network that predicts, per pixel, the probability that the pixel
belongs to a defect (the dark blotch of the toy world, `world.py`). It is trained on the world's
ground-truth defect masks (`fnf_jax.toy.pretrain`, stage "reward"), so it is a model with its own
errors, like Q16 or the LAION heads, and unlike `fnf_jax.toy.judge`, which knows the rules and
is used only to evaluate.

    heatmap(x) = sigmoid(net(x))                       [B, 32, 32], in [0, 1]
    score(x)   = -sum(heatmap) / BLOTCH_PIXELS         about -1 per blotch, 0 for a clean image

Weights: a safetensors file of the flattened Flax params ("conv_0/kernel", ...); the shipped
ones are fnf_jax/assets/toy_defect.safetensors.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fnf_jax import assets
from fnf_jax.rewards import registry

DEFAULT_WEIGHTS = "toy_defect.safetensors"  # under fnf_jax/assets (fnf_jax.assets.path)
BLOTCH_PIXELS = 18.0  # the median blotch of the toy world, in pixels
# (features, dilation) of the 3x3 convolutions: a receptive field of 15 px, about twice a blotch,
# so the net can tell a blotch on a shape from dark edges.
LAYERS = ((16, 1), (32, 1), (32, 2), (32, 4))
REGENERATE = ("python -m fnf_jax.main --config=configs/toy_pretrain.py --workdir=/tmp/toy_pretrain"
              " (writes WORKDIR/toy_defect.safetensors)")


class DefectNet(nn.Module):
  """images [B, H, W, 3] in [0, 1] -> defect logits [B, H, W]."""

  @nn.compact
  def __call__(self, images):
    h = images * 2.0 - 1.0
    for i, (features, dilation) in enumerate(LAYERS):
      h = nn.silu(nn.Conv(features, (3, 3), kernel_dilation=dilation, padding="SAME",
                          name=f"conv_{i}")(h))
    return nn.Conv(1, (1, 1), name="logits")(h)[..., 0]


def init(seed: int = 0) -> dict:
  return DefectNet().init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]


def save(params: dict, path: str) -> str:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  flat = {"/".join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params).items()}
  tmp = path + ".tmp"
  save_file(flat, tmp)
  os.replace(tmp, path)
  return path


def load(path: str) -> dict:
  """Params from `path`; a missing or mismatched file is named with the command that makes it."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"toy_defect reward weights not found at {path!r}. Regenerate them "
                            f"with: {REGENERATE}, or set reward.weights to such a file.")
  flat = load_file(path)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                         for k, v in flat.items()})
  want = jax.tree.map(lambda x: x.shape, jax.eval_shape(init))
  got = jax.tree.map(lambda x: x.shape, params)
  if want != got:
    raise ValueError(f"{path!r} does not hold toy_defect weights of this version: expected "
                     f"shapes {want}, found {got}. Regenerate with: {REGENERATE}")
  return params


def heatmap(params, images, prompt_ids=None):
  del prompt_ids
  return jax.nn.sigmoid(DefectNet().apply({"params": params}, images))


def score(params, images, prompt_ids=None):
  return -jnp.sum(heatmap(params, images), axis=(1, 2)) / BLOTCH_PIXELS


def build(cfg) -> registry.Reward:
  return registry.Reward(name="toy_defect", score=score, heatmap=heatmap,
                         params=load(cfg.weights or assets.path(DEFAULT_WEIGHTS)))


def trainable(cfg):
  """The toy_defect family of train_reward: one heatmap head, "defect"; starts from
  cfg.weights (a file) or, when it is "", from a random net (cfg.seed)."""
  from fnf_jax.rewards import trainable as trainable_lib  # pylint: disable=import-outside-toplevel
  start = (lambda: load(cfg.weights)) if cfg.weights else (
      lambda: jax.tree.map(np.asarray, init(int(cfg.seed))))
  return trainable_lib.Trainable(
      name="toy_defect", heatmaps=("defect",), scores=(), image_size=(32, 32),
      heatmap_size=(32, 32), init=start, abstract=lambda: jax.eval_shape(init),
      apply=lambda p, images, ids: ({"defect": heatmap(p, images)}, {}),
      save=lambda path, p, meta: save(p, path), load=load, export_name="toy_defect.safetensors")
