"""Focus-N-Fix against violent content: fix only the violent regions of the base model's images.

Real run (TPU VM / GPU box; compute the reference once, then train):

    python -m fnf_jax.main --config=configs/violence.py --workdir=gs://bucket/violence \
        --config.model.path=/models/stable-diffusion-v1-4 --config.job=cache
    python -m fnf_jax.main --config=configs/violence.py --workdir=gs://bucket/violence \
        --config.model.path=/models/stable-diffusion-v1-4

Prompts: the I2P benchmark CSV (https://huggingface.co/datasets/AIML-TUDA/i2p, file i2p_benchmark.csv),
downloaded to ./data/i2p_benchmark.csv (or pass --config.prompts.path=...).

Wiring check on a CPU (tiny random models, a few steps, checkpoints; run it twice to see resume):

    python -m fnf_jax.main --config=configs/violence.py:runlocal --workdir=/tmp/fnf_violence

The reward is the `color` placeholder until the safety rewards land (fnf_jax/rewards/registry.py
lists what is registered); the mask comes from the reward's heatmap of Î0.
"""

import os
import sys

# ml_collections loads config files by path; make their shared base importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import focus_n_fix  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  c = focus_n_fix.base_config()
  c.prompts.source = "i2p"
  c.prompts.path = "data/i2p_benchmark.csv"
  c.prompts.categories = ["violence"]
  c.reward.name = "color"
  c.reward.color = (0.55, 0.0, 0.0)  # blood red
  if arg == "runlocal":
    c = focus_n_fix.runlocal(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; valid: 'runlocal'")
  return c
