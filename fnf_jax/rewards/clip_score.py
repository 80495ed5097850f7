"""`clip_score`: image-prompt agreement, CLIPScore (Hessel et al., 2021):
    score = w * max(cos(image_features, text_features(prompt)), 0),   w = cfg.scale [2.5]
The heatmap explains -cos (where the image disagrees with its prompt).

Prompts arrive as the pipeline's token ids, [E, B, T] (one row per text encoder; E = 1 for SD1,
2 for SDXL) or [B, T]. No text is re-tokenized: row cfg.prompt_encoder [0] is fed to the CLIP's
text tower directly. That is right when that row's tokenizer is this CLIP's tokenizer: the
SD1.x/2.x and SDXL first tokenizers are OpenAI CLIP ViT-L/14's, which is also what Q16 and the
LAION heads use. Set cfg.prompt_tokenizer to the pipeline's tokenizer folder (e.g.
<model.path>/tokenizer) to have that checked at build time (same vocabulary size as the CLIP's
text tower, and the same ids as the CLIP's own tokenizer where the CLIP folder ships one); a
mismatch raises. The reward's params hold nothing prompt-specific.

Config fields: clip_path, scale (CLIPScore's w, 2.5 in configs/focus_n_fix.py), prompt_encoder,
prompt_tokenizer ("" = no check), and those of clip_base / saliency.
"""

import jax
import jax.numpy as jnp

from fnf_jax.models import clip_tokenizer
from fnf_jax.rewards import clip_base, registry

_PROBE = "a photo of a red circle, two cats and a dog holding a sign that says 123!"


def check_tokenizer(cfg, clip) -> None:
  folder = cfg.prompt_tokenizer
  if not folder:
    return
  tok = clip_tokenizer.load(folder)
  vocab = clip.config.text_config.vocab_size
  if tok.vocab_size != vocab:
    raise ValueError(
        f"reward {cfg.name!r}: the prompt tokenizer at {folder!r} has {tok.vocab_size} tokens, "
        f"the CLIP at {cfg.clip_path!r} embeds {vocab}: the pipeline's token ids cannot be fed "
        "to this CLIP (use the CLIP that matches the pipeline's first text encoder, e.g. "
        "OpenAI CLIP ViT-L/14 for SD1.x)")
  if clip.tokenizer is not None and (tok([_PROBE]) != clip.tokenize([_PROBE])).any():
    raise ValueError(f"reward {cfg.name!r}: the prompt tokenizer at {folder!r} and the CLIP's "
                     f"own ({clip.tokenizer.source!r}) give different ids")


def prompt_row(prompt_ids, encoder: int, max_length: int) -> jax.Array:
  ids = jnp.asarray(prompt_ids)
  if ids.ndim == 3:
    ids = ids[encoder]
  if ids.ndim != 2 or ids.shape[-1] > max_length:
    raise ValueError(f"clip_score takes prompt ids [E, B, T] or [B, T] with T <= {max_length}; "
                     f"got shape {jnp.shape(prompt_ids)}")
  return ids


def build(cfg) -> registry.Reward:
  clip = clip_base.load_clip(cfg)
  check_tokenizer(cfg, clip)
  scale, encoder = float(cfg.scale), int(cfg.prompt_encoder)
  max_length = clip.config.text_config.max_position_embeddings

  def cosine(params, embeds, prompt_ids):
    ids = prompt_row(prompt_ids, encoder, max_length)
    text = clip.text_features(params["clip"], ids)
    return jnp.sum(clip_base.l2_normalize(embeds) * clip_base.l2_normalize(text), axis=-1)

  def score(params, embeds, prompt_ids):
    return scale * jax.nn.relu(cosine(params, embeds, prompt_ids))

  def target(params, embeds, prompt_ids):
    return -cosine(params, embeds, prompt_ids)

  return clip_base.make_reward(cfg, clip, {}, score, target, uses_text=True)
