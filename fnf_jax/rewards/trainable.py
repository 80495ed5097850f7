"""Heatmap reward models that `train_reward` trains and `eval_reward` scores (config `model`).

A family builds a `Trainable` from its config block: one forward pass that gives every head it
trains (a heatmap reward's `heatmap` and `score` are two of these heads), its starting weights,
and the file layout that the reward of the same name loads, so what the trainer exports is what
fine-tuning later uses:

    rahf        RAHF (fnf_jax/models/rahf.py): heads implausibility, misalignment (heatmaps);
                plausibility, alignment, aesthetics, overall (scores). Exports the file that
                the rahf_plausibility / rahf_alignment rewards read (reward.weights).
    toy_defect  the toy world's defect net (fnf_jax/toy/reward.py): heatmap head "defect".

Packages add families with `add` (the toy world does, from its `__init__`) to `FAMILIES`, a
`fnf_jax.registry.Registry` of the rewards' `Entry`: the builder and the model block's fields.
"""

import dataclasses
from typing import Any, Callable

from fnf_jax.registry import Registry, resolve
from fnf_jax.rewards.registry import Entry


@dataclasses.dataclass(frozen=True, eq=False)
class Trainable:
  name: str
  heatmaps: tuple[str, ...]  # heads that output [B, h, w] in [0, 1]
  scores: tuple[str, ...]  # heads that output [B]
  image_size: tuple[int, int]  # the input the model reads (the data is resized to it)
  heatmap_size: tuple[int, int]  # its heatmaps' size (the targets are resized to it)
  init: Callable[[], Any]  # -> starting params (host numpy): pretrained parts + new heads
  abstract: Callable[[], Any]  # -> the params' shapes, boxed with logical axis names
  # (params, images [B, H, W, 3] in [0, 1], prompt ids or None) -> ({heatmap: ..}, {score: ..})
  apply: Callable[[Any, Any, Any], tuple[dict, dict]]
  save: Callable[[str, Any, dict], None]  # (path, params, metadata): the reward's layout
  load: Callable[[str], Any]  # a saved file -> params
  export_name: str  # the file name `save` writes in WORKDIR/export/
  tokenize: Callable[[list[str]], Any] | None = None  # prompts -> int32 ids [B, L]


# name -> Entry(the "module:function" that builds it from the model block, the block's fields it
# reads besides `name`, for fnf_jax.config.validate).
FAMILIES = Registry("trainable model", "model.name", {
    "rahf": Entry("fnf_jax.rewards.rahf:trainable", ("vit_path", "t5_path", "weights", "dtype",
                                                     "remat", "max_prompt_tokens", "seed")),
})
names = FAMILIES.names


def add(name: str, builder: str, fields=()) -> None:
  FAMILIES.add(name, Entry(builder, tuple(fields)))


def build(cfg) -> Trainable:
  """The family cfg.name's model; raises UnknownName (a ValueError) listing the families."""
  return resolve(FAMILIES.get(cfg.name).builder)(cfg)
