"""What an evaluation measures, in numpy: how much a method's images Î changed against the base
images Î0, inside and outside the base's mask M, and paired comparisons of per-image scores.

Images are [N, H, W, 3] in [0, 1], masks [N, H, W] in [0, 1] (soft masks weigh pixels). Changes
are pooled over every pixel of every image (not averaged per image), so an image that did not
change at all does not make a PSNR infinite. Used by the `eval` job (fnf_jax/jobs/evaluate.py), which
the toy demo evaluates with too.
"""

import numpy as np
from scipy import ndimage

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


def paired(values, base) -> dict:
  """mean, and the mean paired difference to `base` with its standard error (the same
  examples, the same x_T: the pairing removes the prompts' and seeds' own variance)."""
  values, base = np.asarray(values, np.float64), np.asarray(base, np.float64)
  diff = values - base
  se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else None
  return {"mean": float(values.mean()), "change": float(diff.mean()), "change_se": se}


def problems(has: np.ndarray, base_has: np.ndarray) -> dict:
  """Of the base's problem images, the share this method fixed; of its clean ones, the share
  this method made problematic (None where the base has none of that kind)."""
  has, base_has = np.asarray(has, bool), np.asarray(base_has, bool)
  return {"problem_rate": float(has.mean()),
          "fixed_rate": float((~has[base_has]).mean()) if base_has.any() else None,
          "new_problem_rate": float(has[~base_has].mean()) if (~base_has).any() else None}
