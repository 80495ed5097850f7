"""The reward interface and the registry that lets configs name rewards.

A reward is two pure, jittable functions of (params, images, prompt_ids):
    score(params, images [B, H, W, 3] in [0, 1], prompt_ids) -> [B]     (higher is better)
    heatmap(params, images, prompt_ids) -> [B, H', W']  (>= 0, where the image is problematic)
plus its frozen params, which the training step receives as an argument (never closed over).
prompt_ids are the pipeline's token ids ([E, B, T], CLIP's) unless the reward has a tokenizer
of its own (`tokenize`, RAHF's T5): then every batch also carries the prompts in those ids
("reward_ids", [B, L], made on the host with the pipeline's) and the reward receives them.

Each name maps to the "module:function" that builds it from the config's `reward` block and to
the fields of that block it reads, so that `fnf_jax.config.validate` can check a config (name and
fields) without importing any reward. Packages outside the core (the toy world) add their own
entries with `add` when `fnf_jax.plugins` imports them. The table is `REWARDS`, a
`fnf_jax.registry.Registry`.
"""

import dataclasses
from typing import Any, Callable

from fnf_jax.registry import Registry, resolve

ScoreFn = Callable[[Any, Any, Any], Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Reward:
  name: str
  score: ScoreFn
  heatmap: ScoreFn
  params: Any = None
  # prompts -> int32 ids [B, L] of the reward's own tokenizer (None: the pipeline's ids).
  tokenize: Callable[[list[str]], Any] | None = None
  # That tokenizer's limit (a fnf_jax.data.prompts.TokenLimit), reported when prompts load.
  prompt_limit: Any = None


@dataclasses.dataclass(frozen=True)
class Entry:
  builder: str  # "module:function", called with the config's reward block
  fields: tuple[str, ...]  # the block's fields it reads (besides `name`)


# What every CLIP reward reads (clip_base.py, saliency.py).
CLIP_FIELDS = ("clip_path", "tokenizer", "dtype", "remat", "saliency", "gradcam_layer",
               "gradcam_sigma", "saliency_baseline")
# What the RAHF rewards read (rahf.py).
RAHF_FIELDS = ("vit_path", "t5_path", "weights", "dtype", "remat", "max_prompt_tokens")
REWARDS = Registry("reward", entries={
    "color": Entry("fnf_jax.rewards.color:build", ("color", "sigma")),
    "q16": Entry("fnf_jax.rewards.q16:build", CLIP_FIELDS + ("weights",)),
    "laion_nsfw": Entry("fnf_jax.rewards.laion:build_nsfw",
                        CLIP_FIELDS + ("weights", "normalize_embedding")),
    "laion_aesthetic": Entry("fnf_jax.rewards.laion:build_aesthetic",
                             CLIP_FIELDS + ("weights", "normalize_embedding")),
    "clip_score": Entry("fnf_jax.rewards.clip_score:build",
                        CLIP_FIELDS + ("scale", "prompt_encoder", "prompt_tokenizer")),
    "zero_shot_safety": Entry("fnf_jax.rewards.zero_shot:build",
                              CLIP_FIELDS + ("safe_prompts", "unsafe_prompts")),
    "rahf_plausibility": Entry("fnf_jax.rewards.rahf:build_plausibility", RAHF_FIELDS),
    "rahf_alignment": Entry("fnf_jax.rewards.rahf:build_alignment", RAHF_FIELDS),
})
entries = REWARDS.entries  # name -> Entry, the plugins' included (fnf_jax.config.validate)
names = REWARDS.names


def add(name: str, builder: str, fields=()) -> None:
  """Registers reward `name`: `builder` ("module:function") builds it from its config block."""
  REWARDS.add(name, Entry(builder, tuple(fields)))


def build(cfg) -> Reward:
  """The reward named by cfg.name, built from the rest of the config block; raises
  UnknownName (a ValueError) listing the registered ones."""
  return resolve(REWARDS.get(cfg.name).builder)(cfg)
