"""Global DRaFT (Clark et al., 2024): the baseline, as the same code with M ≡ 1 and β = γ = 0.

The reward's mask M of Î0 is still computed: it does not enter the objective, but the logged
change_inside / change_outside are measured in it, comparable with a Focus-N-Fix run.

    python -m fnf_jax.main --config=configs/draft.py --workdir=/mnt/bucket/draft \
        --config.model.path=/models/stable-diffusion-v1-4

Wiring check on a CPU:

    python -m fnf_jax.main --config=configs/draft.py:runlocal --workdir=/tmp/fnf_draft
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import violence  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  c = violence.get_config(arg)
  c.objective.mask = "ones"  # M ≡ 1: the whole image may change
  c.objective.reward_region = "full"
  c.objective.beta = 0.0
  c.objective.gamma = 0.0
  c.train.grad_steps = 1  # DRaFT-1, the usual choice
  return c
