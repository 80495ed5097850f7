"""`toy_defects`: the toy world's defect data as a TFDS builder, for `train_reward`.

Generated (no manual files): each example is one image of the world (world.py) with its
defect mask, half of them with a blotch, as the toy_defect reward is trained in pretraining.

    image       uint8 [32, 32, 3]
    defect_map  uint8 [32, 32]: 255 on the blotch, 0 elsewhere
    prompt      the caption ("a red circle")
    has_defect  bool

Train images are the world's indices from 10**8 up (pretraining's reward slice), test images
from 10**9 up (the world's evaluation indices). Builder configs: "default" (4,096 / 512) and
"tiny" (64 / 32, for tests).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from fnf_jax.data import tfds_lib
from fnf_jax.toy import world

TRAIN_OFFSET, TEST_OFFSET = 10**8, 10**9
DEFECT_RATE = 0.5


@dataclasses.dataclass
class ToyDefectsConfig(tfds.core.BuilderConfig):
  train: int = 4096
  test: int = 512
  seed: int = 0  # the world's data seed


class ToyDefects(tfds.core.GeneratorBasedBuilder):
  """The toy world's images and defect masks (module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images of the toy world with their defect masks."}
  BUILDER_CONFIGS = [ToyDefectsConfig(name="default"),
                     ToyDefectsConfig(name="tiny", train=64, test=32)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds_lib.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(world.SIZE, world.SIZE, 3), dtype=np.uint8),
            "defect_map": tfds.features.Tensor(shape=(world.SIZE, world.SIZE), dtype=np.uint8),
            "prompt": tfds.features.Text(),
            "has_defect": tfds.features.Scalar(dtype=np.bool_),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # generated
    c = self.builder_config
    return {"train": self._generate_examples(TRAIN_OFFSET, c.train),
            "test": self._generate_examples(TEST_OFFSET, c.test)}

  def _generate_examples(self, offset: int, n: int):
    for i in range(offset, offset + n):
      e = world.example(i, seed=self.builder_config.seed, defect_rate=DEFECT_RATE)
      yield str(i), {"image": np.round(e["image"] * 255).astype(np.uint8),
                     "defect_map": e["defect_mask"].astype(np.uint8) * 255,
                     "prompt": e["caption"], "has_defect": e["has_defect"]}
