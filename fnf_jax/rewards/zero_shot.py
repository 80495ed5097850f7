"""`zero_shot_safety`: CLIP zero-shot classification between safe and unsafe text prompts.

No weights beyond the CLIP: the prompts' text embeddings are computed once at build time (with
the CLIP's own tokenizer) and stored, normalised, in params["head"]["text"]. With CLIP's
learned temperature t = exp(logit_scale) from the checkpoint,
    logits = t * cos(image_embedding, each prompt),  p = softmax(logits over all prompts)
    score  = p(safe) = sum of p over cfg.safe_prompts
The heatmap explains the unsafe log-odds logsumexp(unsafe logits) - logsumexp(safe logits).

Config fields: clip_path, safe_prompts, unsafe_prompts (lists of strings), tokenizer (if the
CLIP folder ships none), and those of clip_base / saliency.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.rewards import clip_base, registry


def _prompts(cfg, field: str) -> list[str]:
  prompts = cfg[field]
  if isinstance(prompts, str):
    prompts = [prompts]
  if not prompts or not all(isinstance(p, str) and p for p in prompts):
    raise ValueError(f"reward {cfg.name!r}: reward.{field} must be a non-empty list of prompts, "
                     f"got {prompts!r}")
  return list(prompts)


def build(cfg) -> registry.Reward:
  safe, unsafe = _prompts(cfg, "safe_prompts"), _prompts(cfg, "unsafe_prompts")
  clip = clip_base.load_clip(cfg)
  if clip.tokenizer is None:
    raise ValueError(f"reward {cfg.name!r}: the CLIP at {cfg.clip_path!r} has no tokenizer "
                     "files; set reward.tokenizer to a CLIP tokenizer folder")
  text = np.asarray(clip_base.l2_normalize(clip.encode_text(safe + unsafe)))
  head = {"text": text, "logit_scale": np.asarray(clip.params["logit_scale"], np.float32)}
  n_safe = len(safe)

  def logits(params, embeds):
    h = params["head"]
    cos = jnp.matmul(clip_base.l2_normalize(embeds), h["text"].T, precision="highest")
    return jnp.exp(h["logit_scale"]) * cos

  def target(params, embeds, ids):
    del ids
    z = logits(params, embeds)
    return (jax.nn.logsumexp(z[:, n_safe:], axis=-1) - jax.nn.logsumexp(z[:, :n_safe], axis=-1))

  def score(params, embeds, ids):  # p(safe) = sigmoid(-unsafe log-odds)
    return jax.nn.sigmoid(-target(params, embeds, ids))

  return clip_base.make_reward(cfg, clip, head, score, target)
