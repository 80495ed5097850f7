"""Focus-N-Fix for plausibility: repair local artifacts (distorted hands, faces, bodies) only
where RAHF's implausibility heatmap puts them (the paper's plausibility setting).

Reward: `rahf_plausibility` (fnf_jax/rewards/rahf.py): RAHF's plausibility score as the reward,
its implausibility heatmap as the mask. RAHF runs on google/vit-large-patch16-384 + t5-base;
README, "RAHF rewards", says where the checkpoint comes from. Get and convert once:

    huggingface-cli download google/vit-large-patch16-384 config.json preprocessor_config.json \
        --local-dir /models/vit-large-patch16-384
    huggingface-cli download google-t5/t5-base config.json tokenizer.json --local-dir /models/t5-base
    python tools/convert_rahf.py RAHF_CHECKPOINT.pth --vit /models/vit-large-patch16-384 \
        --t5 /models/t5-base --out /models/rahf/rahf.safetensors

Real run:

    python -m fnf_jax.main --config=configs/plausibility.py --workdir=/mnt/bucket/plaus \
        --config.model.path=/models/stable-diffusion-v1-4

Prompts: PartiPrompts (PartiPrompts.tsv from google-research/parti; fnf_jax ships a copy, read
when prompts.path is ""); the People and Animals categories, where bodies go wrong.

Alternative without RAHF weights (`:laion`): the LAION aesthetic predictor on CLIP ViT-L/14 as
the reward and the Grad-CAM saliency of its rating as the mask, a quality reward whose mask is
an explanation, not a detection:

    huggingface-cli download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14 \
        --include '*.json' '*.txt' model.safetensors
    wget https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth
    python tools/convert_laion_heads.py aesthetic sac+logos+ava1-l14-linearMSE.pth \
        /models/laion/aesthetic_vit_l14.safetensors
    python -m fnf_jax.main --config=configs/plausibility.py:laion --workdir=/mnt/bucket/plaus_laion \
        --config.model.path=/models/stable-diffusion-v1-4

Wiring check on a CPU (tiny random SD and a tiny random RAHF; run it twice to see resume):

    python -m fnf_jax.main --config=configs/plausibility.py:runlocal --workdir=/tmp/fnf_plaus
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import focus_n_fix  # noqa: E402  pylint: disable=g-import-not-at-top

ARGS = (None, "runlocal", "laion")


def get_config(arg: str | None = None):
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; valid: {ARGS[1:]}")
  c = focus_n_fix.base_config()
  c.prompts.source = "parti"
  c.prompts.path = ""  # "": the PartiPrompts.tsv that fnf_jax ships (fnf_jax/assets)
  c.prompts.categories = ("People", "Animals")  # where hands, faces and bodies go wrong
  if arg and arg.startswith("laion"):
    c.reward = focus_n_fix.clip_reward("laion_aesthetic",
                                       "/models/laion/aesthetic_vit_l14.safetensors")
    # The aesthetic rating runs about 1-10; LAION-Aesthetics' "5+" subsets draw the line at 5.
    c.mask.gate_threshold = 5.0
    return c
  c.reward = focus_n_fix.rahf_reward("rahf_plausibility")
  focus_n_fix.rahf_mask(c)
  return focus_n_fix.tiny_rahf(c) if arg == "runlocal" else c
