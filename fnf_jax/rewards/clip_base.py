"""What every CLIP-based reward shares: loading the CLIP and the head weights with errors that say
how to get them, the embedding-size check, and turning a head into a Reward.

A CLIP reward is a head on CLIP's image embedding:
    score(params, images, ids)  = head score of clip.image_features(params["clip"], images)
    heatmap(params, images, ids) = saliency of the head's *target* (see saliency.py)
with params = {"clip": CLIP params, "head": the head's arrays}, so the training step passes them
in as frozen arguments. Config fields read here (their values live in the configs, see
`clip_reward` in configs/focus_n_fix.py): clip_path, weights (by the heads that have a file),
tokenizer (a folder, or "" for the CLIP folder's own), dtype, remat, and saliency.py's fields.
"""

import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from fnf_jax.config import sources
from fnf_jax.models import clip as clip_lib
from fnf_jax.models import convert
from fnf_jax.rewards import registry, saliency

# Known CLIP widths, to say which CLIP a head needs.
CLIP_BY_DIM = {512: "CLIP ViT-B/32", 768: "CLIP ViT-L/14", 1024: "CLIP ViT-H/14"}
CLIP_DOWNLOAD = f"Get {sources.text('clip')}\nand set reward.clip_path to it."


def load_clip(cfg) -> clip_lib.Clip:
  path = cfg.clip_path
  if not path or not os.path.exists(path):
    raise convert.CheckpointError(
        f"reward {cfg.name!r}: CLIP not found at reward.clip_path={path!r}.\n{CLIP_DOWNLOAD}")
  return clip_lib.load(path, dtype=cfg.dtype, remat=cfg.remat, tokenizer=cfg.tokenizer or None)


def weights_path(cfg, instructions: str) -> str:
  """cfg.weights, which must exist; otherwise an error naming it and how to make it."""
  path = cfg.weights
  if not path or not os.path.isfile(path):
    raise convert.CheckpointError(
        f"reward {cfg.name!r}: head weights not found at reward.weights={path!r}.\n"
        f"{instructions}")
  return path


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  if not path.endswith(".safetensors"):
    raise convert.CheckpointError(
        f"{path!r}: head weights are read from *.safetensors (convert them with tools/)")
  return {k: np.asarray(v, np.float32) for k, v in convert.read_state_dict([path]).items()}


def embed_dim(clip: clip_lib.Clip) -> int:
  return clip.config.projection_dim


def check_dim(head_dim: int, clip: clip_lib.Clip, cfg, what: str) -> None:
  """A head trained on one CLIP's embeddings is meaningless on another's: say which it needs."""
  got = embed_dim(clip)
  if head_dim != got:
    need = CLIP_BY_DIM.get(head_dim, "a CLIP with that projection width")
    have = CLIP_BY_DIM.get(got, "an unknown CLIP")
    raise ValueError(
        f"reward {cfg.name!r}: {what} takes {head_dim}-d embeddings ({need}); the CLIP at "
        f"reward.clip_path={cfg.clip_path!r} gives {got}-d ({have}).")


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# The CLIPModel params the text tower alone uses.
TEXT_PARAMS = ("text_model", "text_projection")
HeadFn = Callable[[Any, jnp.ndarray, Any], jnp.ndarray]


def make_reward(cfg, clip: clip_lib.Clip, head_params: Any, score: HeadFn, target: HeadFn,
                uses_text: bool = False) -> registry.Reward:
  """A Reward from a head: `score` (higher is better) and `target` (higher is worse, unsquashed:
  what the heatmap explains), both (params, image_embeds [B, P], ids) -> [B].

  Heads that never run the text tower (`uses_text=False`) get params without it (a third of
  ViT-L/14's weights, replicated on every device otherwise). The Clip object lets go of its
  own reference, so only the Reward's params keep the weights alive.
  """
  clip_params = dict(clip.params)
  if not uses_text:
    clip_params = {k: v for k, v in clip_params.items() if k not in TEXT_PARAMS}
  clip.params = None  # from here on params come in as arguments (the Reward's contract)

  def score_fn(params, images, prompt_ids):
    return score(params, clip.image_features(params["clip"], images), prompt_ids)

  return registry.Reward(name=cfg.name, score=score_fn,
                         heatmap=saliency.heatmap_fn(cfg, clip, target),
                         params={"clip": clip_params, "head": head_params})
