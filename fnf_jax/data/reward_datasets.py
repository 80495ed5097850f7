"""The reward datasets' table (`data.name`): each name's TFDS builder and which of its fields
train which head of a model (fnf_jax/data/reward_data.py reads them). Imports nothing heavy:
the config check (fnf_jax/config/validate.py) and the plugins read this table before jax or
numpy loads. Packages add theirs with `add` (the toy world does, from its `__init__`).
"""

import dataclasses

from fnf_jax.registry import Registry, resolve


@dataclasses.dataclass(frozen=True)
class Dataset:
  builder: str  # "module:Class" of the TFDS builder
  heatmaps: dict  # model head -> the dataset's map field (uint8 [H, W], 0-255)
  scores: dict  # model head -> the dataset's float field
  manual: bool  # built from files the user downloads (data.manual_dir)
  train_split: str
  eval_splits: tuple[str, ...]


DATASETS = Registry("reward dataset", "data.name", {
    "richhf18k": Dataset(
        "fnf_jax.data.richhf18k:Richhf18k",
        {"implausibility": "artifact_map", "misalignment": "misalignment_map"},
        {"plausibility": "artifact_score", "alignment": "misalignment_score",
         "aesthetics": "aesthetics_score", "overall": "overall_score"},
        manual=True, train_split="train", eval_splits=("dev", "test")),
})
add = DATASETS.add
names = DATASETS.names
get = DATASETS.get  # raises KeyError: "data.name = 'NAME' is not one of [...]"


def builder_class(dataset: Dataset):
  return resolve(dataset.builder)
