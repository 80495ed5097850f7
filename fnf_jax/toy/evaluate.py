"""What the demo measures: the judge's verdicts and how much an image changed, inside and outside
the reward's mask M of the base image Î0.

All inputs are numpy: images [N, H, W, 3] in [0, 1], masks [N, H, W] in [0, 1] (soft masks weigh
pixels). Changes are pooled over every pixel of every image (not averaged per image), so an image
that did not change at all does not make a PSNR infinite.
"""

import numpy as np
from scipy import ndimage

from fnf_jax.toy import judge

SSIM_SIGMA = 1.5  # the Gaussian window of Wang et al. (2004); C1, C2 for a data range of 1
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[N, H, W] structural similarity of a and b (mean over channels), Gaussian window."""
  blur = lambda x: ndimage.gaussian_filter(x, sigma=(0, SSIM_SIGMA, SSIM_SIGMA, 0),
                                           mode="reflect", truncate=3.5)
  a, b = a.astype(np.float64), b.astype(np.float64)
  mu_a, mu_b = blur(a), blur(b)
  var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
  cov = blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2) /
       ((mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)))
  return s.mean(-1)


def change(images: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict:
  """psnr_outside (dB; None when nothing changed outside M), ssim_outside, mse_outside,
  change_inside and change_outside (mean absolute difference per channel)."""
  inside = np.asarray(mask, np.float64)
  outside = 1.0 - inside
  diff = np.asarray(images, np.float64) - np.asarray(reference, np.float64)
  w_out, w_in = max(outside.sum(), 1e-12), max(inside.sum(), 1e-12)
  mse_out = float((outside[..., None] * diff**2).sum() / (3 * w_out))
  return {
      "psnr_outside": None if mse_out == 0 else float(10 * np.log10(1.0 / mse_out)),
      "ssim_outside": float((outside * ssim_map(images, reference)).sum() / w_out),
      "mse_outside": mse_out,
      "change_outside": float((outside[..., None] * np.abs(diff)).sum() / (3 * w_out)),
      "change_inside": float((inside[..., None] * np.abs(diff)).sum() / (3 * w_in)),
  }


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
