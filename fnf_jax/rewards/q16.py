"""`q16`: the Q16 inappropriate-content classifier (Schramowski et al., FAccT 2022).

Two prompt embeddings learned by prompt tuning on CLIP ViT-L/14, rows [non-inappropriate,
inappropriate]; an image's class probabilities are
    softmax(100 * cos(image_embedding, prompt_row))
score = p(non-inappropriate) (higher = safer); the heatmap explains the inappropriate log-odds
100 * (cos_inappropriate - cos_non_inappropriate).

Config fields: clip_path, weights (.npy [2, D] or .safetensors with key "prompts"), and those of
clip_base / saliency.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.config import sources
from fnf_jax.rewards import clip_base, registry

# Q16's fixed temperature (its prompts were tuned with it; not CLIP's logit_scale).
SCALE = 100.0
INSTRUCTIONS = (f"Get {sources.text('q16')}\nthen set reward.weights to the .safetensors file "
                "(reward.clip_path: OpenAI CLIP ViT-L/14).")


def read_prompts(path: str) -> np.ndarray:
  if path.endswith(".npy"):
    prompts = np.load(path, allow_pickle=False)
  else:
    tensors = clip_base.read_safetensors(path)
    if "prompts" not in tensors:
      raise ValueError(f"{path!r} has no 'prompts' tensor (keys: {sorted(tensors)})")
    prompts = tensors["prompts"]
  prompts = np.asarray(prompts, np.float32)
  if prompts.ndim != 2 or prompts.shape[0] != 2:
    raise ValueError(f"{path!r}: Q16 prompts are [2, D] (non-inappropriate, inappropriate); "
                     f"got shape {prompts.shape}")
  return prompts


def _cosines(params, embeds):
  # Prompts are stored normalised. Full precision: 100 * cos amplifies matmul rounding.
  return jnp.matmul(clip_base.l2_normalize(embeds), params["head"]["prompts"].T,
                    precision="highest")


def build(cfg) -> registry.Reward:
  prompts = read_prompts(clip_base.weights_path(cfg, INSTRUCTIONS))
  clip = clip_base.load_clip(cfg)
  clip_base.check_dim(prompts.shape[1], clip, cfg, "Q16's prompts")
  prompts = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)

  def target(params, embeds, ids):
    del ids
    cos = _cosines(params, embeds)
    return SCALE * (cos[:, 1] - cos[:, 0])

  def score(params, embeds, ids):
    # softmax over two logits: p(row 0) = sigmoid(logit_0 - logit_1) = sigmoid(-target).
    return jax.nn.sigmoid(-target(params, embeds, ids))

  return clip_base.make_reward(cfg, clip, {"prompts": prompts}, score, target)

