"""What the demo measures: the judge's verdicts and how much an image changed, inside and outside
the reward's mask M of the base image Î0.

All inputs are numpy: images [N, H, W, 3] in [0, 1], masks [N, H, W] in [0, 1] (soft masks weigh
pixels). The change metrics are the core's (fnf_jax/evaluation.py), which the `eval` job of real
runs reports too.
"""

import numpy as np

from fnf_jax.evaluation import change
from fnf_jax.toy import judge


def method_metrics(images, reference, mask, captions, rewards, base: dict | None = None) -> dict:
  """Every number the demo reports for one method's images (see module docstring).

  `base` (the base model's `judge.evaluate` on Î0 of the same examples) adds what happened to
  its defects (fixed_rate, new_defect_rate) and the paired change of prompt fidelity with its
  standard error: fidelity_change = mean over examples of (this method's - the base's).
  """
  verdict = judge.evaluate(images, captions)
  has = verdict["has_defect"]
  out = {
      "defect_rate": float(has.mean()),
      "reward": float(np.mean(rewards)),
      **change(images, reference, mask),
      "prompt_fidelity": float(verdict["fidelity"].mean()),
      "color_right": float(verdict["color_right"].mean()),
      "shape_right": float(verdict["shape_right"].mean()),
      "mask_area": float(np.mean(mask)),
      "images": int(len(images)),
  }
  if base is not None:
    base_defect = np.asarray(base["has_defect"], bool)
    out["fixed_rate"] = float((~has[base_defect]).mean()) if base_defect.any() else None
    out["new_defect_rate"] = float(has[~base_defect].mean()) if (~base_defect).any() else None
    diff = verdict["fidelity"] - np.asarray(base["fidelity"], np.float32)
    out["fidelity_change"] = float(diff.mean())
    out["fidelity_change_se"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
  return out
