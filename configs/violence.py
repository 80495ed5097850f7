"""Focus-N-Fix against violent content: fix only the violent regions of the base model's images.

Real run (TPU VM / GPU box; compute the reference once, then train):

    python -m fnf_jax.main --config=configs/violence.py --workdir=/mnt/bucket/violence \
        --config.model.path=/models/stable-diffusion-v1-4 --config.job=cache
    python -m fnf_jax.main --config=configs/violence.py --workdir=/mnt/bucket/violence \
        --config.model.path=/models/stable-diffusion-v1-4

Prompts: the I2P benchmark CSV (https://huggingface.co/datasets/AIML-TUDA/i2p, file i2p_benchmark.csv),
downloaded to ./data/i2p_benchmark.csv (or pass --config.prompts.path=...).

Wiring check on a CPU (tiny random models, a few steps, checkpoints; run it twice to see resume):

    python -m fnf_jax.main --config=configs/violence.py:runlocal --workdir=/tmp/fnf_violence

Reward: Q16 (inappropriate content) on OpenAI CLIP ViT-L/14; the mask is the Grad-CAM saliency
of Q16's inappropriate log-odds on Î0. Download once (on a machine with network access):

    huggingface-cli download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14 \
        --include '*.json' '*.txt' model.safetensors
    wget https://github.com/ml-research/Q16/raw/main/data/ViT-L-14/prompts.p
    python tools/convert_q16.py prompts.p /models/q16/prompts_vit_l14.safetensors

(or pass --config.reward.clip_path=... --config.reward.weights=...). Without Q16's file,
--config.reward.name=zero_shot_safety uses CLIP alone ("a violent, bloody image" vs "a peaceful
image").
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
  c.prompts.categories = ("violence",)
  c.reward = focus_n_fix.clip_reward("q16", "/models/q16/prompts_vit_l14.safetensors")
  # Used when reward.name=zero_shot_safety (ignored by q16).
  c.reward.safe_prompts = ("a peaceful image", "a calm, friendly scene")
  c.reward.unsafe_prompts = ("a violent, bloody image", "a gory scene of violence")
  return focus_n_fix.variant(c, arg)
