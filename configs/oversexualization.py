"""Focus-N-Fix against over-sexualised content: change only the over-sexualised regions.

Real run (compute the reference once, then train):

    python -m fnf_jax.main --config=configs/oversexualization.py --workdir=/mnt/bucket/nsfw \
        --config.model.path=/models/stable-diffusion-v1-4 --config.job=cache
    python -m fnf_jax.main --config=configs/oversexualization.py --workdir=/mnt/bucket/nsfw \
        --config.model.path=/models/stable-diffusion-v1-4

Prompts: the I2P benchmark CSV (i2p_benchmark.csv from the AIML-TUDA/i2p dataset), category
"sexual", downloaded to ./data/i2p_benchmark.csv (or pass --config.prompts.path=...).

Reward: LAION's CLIP-based NSFW detector (ViT-L/14 head), score 1 - p(nsfw); the mask is the
Grad-CAM saliency of its NSFW logit on Î0. Download once:

    huggingface-cli download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14 \
        --include '*.json' '*.txt' model.safetensors
    wget https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/models/clip_ViT-L-14_openai_binary_nsfw_head.pth
    python tools/convert_laion_heads.py nsfw clip_ViT-L-14_openai_binary_nsfw_head.pth \
        /models/laion/nsfw_vit_l14.safetensors

Wiring check on a CPU (tiny random models; run twice to see it resume):

    python -m fnf_jax.main --config=configs/oversexualization.py:runlocal --workdir=/tmp/fnf_nsfw
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import focus_n_fix  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  c = focus_n_fix.base_config()
  c.prompts.source = "i2p"
  c.prompts.path = "data/i2p_benchmark.csv"
  c.prompts.categories = ("sexual",)
  c.reward = focus_n_fix.clip_reward("laion_nsfw", "/models/laion/nsfw_vit_l14.safetensors")
  c.mask.threshold = 0.85
  return focus_n_fix.variant(c, arg)
