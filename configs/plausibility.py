"""Focus-N-Fix for plausibility: repair local artifacts (the paper's RAHF setting).

The paper uses the RAHF plausibility score as reward and its implausibility heatmap as mask;
RAHF weights are not public, so this config runs the same objective with the LAION aesthetic
predictor (ViT-L/14 head) and the Grad-CAM saliency of its score as the mask. Download once:

    huggingface-cli download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14 \
        --include '*.json' '*.txt' model.safetensors
    wget https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth
    python tools/convert_laion_heads.py aesthetic sac+logos+ava1-l14-linearMSE.pth \
        /models/laion/aesthetic_vit_l14.safetensors

Real run:

    python -m fnf_jax.main --config=configs/plausibility.py --workdir=/mnt/bucket/plaus \
        --config.model.path=/models/stable-diffusion-v1-4 --config.job=cache
    python -m fnf_jax.main --config=configs/plausibility.py --workdir=/mnt/bucket/plaus \
        --config.model.path=/models/stable-diffusion-v1-4

Prompts: PartiPrompts (PartiPrompts.tsv from google-research/parti), saved as
./data/PartiPrompts.tsv.

Wiring check on a CPU:

    python -m fnf_jax.main --config=configs/plausibility.py:runlocal --workdir=/tmp/fnf_plaus
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import focus_n_fix  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  c = focus_n_fix.base_config()
  c.prompts.source = "parti"
  c.prompts.path = "data/PartiPrompts.tsv"
  c.prompts.categories = ("People", "Animals")  # where hands, faces and bodies go wrong
  # Quality reward with a saliency mask, until an implausibility-heatmap model is available.
  c.reward = focus_n_fix.clip_reward("laion_aesthetic", "/models/laion/aesthetic_vit_l14.safetensors")
  # The aesthetic rating runs about 1-10; LAION-Aesthetics' "5+" subsets draw the line at 5.
  c.mask.gate_threshold = 5.0
  return focus_n_fix.variant(c, arg)
