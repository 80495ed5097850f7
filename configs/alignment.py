"""Focus-N-Fix for text-image alignment: change only the regions where the image disagrees with
its prompt, as RAHF's misalignment heatmap marks them (the paper's alignment setting).

Reward: `rahf_alignment` (fnf_jax/rewards/rahf.py): RAHF's alignment score as the reward, its
misalignment heatmap as the mask; the prompt reaches RAHF's T5 in T5's own tokens. Models and
the one-time conversion as in configs/plausibility.py (README, "RAHF rewards").

Real run:

    python -m fnf_jax.main --config=configs/alignment.py --workdir=/mnt/bucket/align \
        --config.model.path=/models/stable-diffusion-v1-4

Prompts: all of PartiPrompts (the copy fnf_jax ships; or --config.prompts.path=...), whose categories and challenges
(counting, spatial relations, text rendering) are what alignment fails at; narrow them with
--config.prompts.categories='("Animals", "Artifacts")'.

Wiring check on a CPU (tiny random SD and a tiny random RAHF; run it twice to see resume):

    python -m fnf_jax.main --config=configs/alignment.py:runlocal --workdir=/tmp/fnf_align
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import focus_n_fix  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  if arg not in (None, "runlocal"):
    raise ValueError(f"unknown config argument {arg!r}; valid: 'runlocal'")
  c = focus_n_fix.base_config()
  c.prompts.source = "parti"
  c.prompts.path = ""  # "": the PartiPrompts.tsv that fnf_jax ships (fnf_jax/assets)
  c.prompts.categories = ()  # all 1,632 prompts
  c.reward = focus_n_fix.rahf_reward("rahf_alignment")
  focus_n_fix.rahf_mask(c)
  return focus_n_fix.tiny_rahf(c) if arg == "runlocal" else c
