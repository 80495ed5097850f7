"""RAHF's evaluation metrics for a score + heatmap reward model (numpy + scipy only).

RAHF (Liang et al., "Rich Human Feedback for Text-to-Image Generation", CVPR 2024) reports
PLCC / SRCC for its scores and, for its heatmaps, MSE over all images and over those whose
ground truth is empty, plus the saliency metrics CC, KLD, SIM, NSS and AUC-Judd over the images
whose ground truth is not empty. The heatmap metrics follow the MIT/Tuebingen saliency benchmark
(Bylinskii et al., "What do different evaluation metrics tell us about saliency models?", TPAMI
2019; MATLAB code github.com/cvzoya/saliency, code_forMetrics/):

  cc        Pearson correlation of the two maps, pixels as samples (CC.m).
  kld       sum G * log(eps + G / (P + eps)), P and G each normalised to sum 1, eps = 2.2204e-16
            (KLdiv.m; like it, an all-zero map is left all-zero, so a zero prediction is finite
            but heavily penalised).
  sim       sum min(P, G), P and G normalised to sum 1 (the paper's formula; similarity.m first
            rescales each map to [0, 1], which changes nothing when a map's minimum is 0).
  nss       mean of (P - mean P) / std P at the fixations; std with N - 1 like MATLAB's std.
  auc_judd  thresholds at the prediction's values at the fixations; TPR over fixations, FPR over
            the other pixels, (0, 0) and (1, 1) added, trapezoidal area (AUC_Judd.m).

Fixations. RAHF's ground truth is a continuous map, not fixation points: a pixel is a fixation
where gt > threshold (default 0, i.e. every pixel the annotators marked at all), and a ground
truth is "empty" when it has no fixation (with the default: all zero).

AUC-Judd ties. AUC_Judd.m adds random jitter (1e-7) to break ties, because its TPR i/Nfix is only
right for distinct values. Here the thresholds are the *distinct* fixation values and TPR / FPR
count every pixel >= the threshold: deterministic, equal to AUC_Judd.m whenever the fixation values
are distinct, and a constant prediction gets exactly 0.5 (the jitter's expected value).

Edge cases, one rule: a degenerate *prediction* scores chance level, a degenerate *ground truth*
gives NaN (nothing to compare against), invalid input raises ValueError.
  - constant prediction: cc = 0, nss = 0, auc_judd = 0.5, plcc / srcc = 0 (non-constant truth).
  - empty ground truth: cc, kld, sim, nss, auc_judd = NaN (heatmap_report never averages them).
  - constant ground truth (cc, plcc, srcc), or every pixel a fixation (auc_judd: no negatives): NaN.
  - mismatched shapes, non-2-D maps, empty arrays, NaN / inf, pred < 0, gt outside [0, 1], fewer
    than 2 scores: ValueError.
heatmap_report averages each metric over the examples where it is defined and says how many
("n_<metric>"), so a NaN from a degenerate ground truth neither poisons nor silently shrinks it.
"""

import numpy as np
from scipy import stats

EPS = 2.2204e-16  # MATLAB's eps, as the saliency benchmark uses it.
HEATMAP_METRICS = ("cc", "kld", "sim", "nss", "auc_judd")


def _finite(name, x):
  x = np.asarray(x, dtype=np.float64)
  if x.size == 0:
    raise ValueError(f"{name} is empty (shape {x.shape})")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} has NaN or inf values")
  return x


def _pair(pred, gt):
  pred, gt = _finite("pred", pred), _finite("gt", gt)
  if pred.shape != gt.shape:
    raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
  if pred.ndim != 2:  # A batch [B, H, W] would silently pool pixels across images.
    raise ValueError(f"expected [H, W] maps, got shape {pred.shape}")
  if pred.min() < 0:
    raise ValueError(f"pred must be >= 0, min is {pred.min()}")
  if gt.min() < 0 or gt.max() > 1:
    raise ValueError(f"gt must lie in [0, 1], range is [{gt.min()}, {gt.max()}]")
  return pred, gt


def _pearson(x, y):
  """Pearson r of two flat arrays; constant y (truth) -> NaN, constant x (prediction) -> 0."""
  # Exact constancy test: mean() of equal floats can round, leaving noise that would score +-1.
  if np.ptp(y) == 0:
    return float("nan")
  if np.ptp(x) == 0:
    return 0.0
  x, y = x - x.mean(), y - y.mean()
  return float(np.clip(x @ y / np.sqrt((x @ x) * (y @ y)), -1.0, 1.0))


def _sum1(x):
  s = x.sum()
  return x / s if s > 0 else x  # An all-zero map stays all-zero, as in KLdiv.m / similarity.m.


def mse(pred, gt) -> float:
  pred, gt = _pair(pred, gt)
  return float(np.mean((pred - gt) ** 2))


def cc(pred, gt) -> float:
  pred, gt = _pair(pred, gt)
  return _pearson(pred.ravel(), gt.ravel()) if gt.any() else float("nan")


def kld(pred, gt) -> float:
  pred, gt = _pair(pred, gt)
  if not gt.any():
    return float("nan")
  p, g = _sum1(pred), _sum1(gt)
  return float(np.sum(g * np.log(EPS + g / (p + EPS))))


def sim(pred, gt) -> float:
  pred, gt = _pair(pred, gt)
  if not gt.any():
    return float("nan")
  return float(np.minimum(_sum1(pred), _sum1(gt)).sum())


def nss(pred, gt, threshold: float = 0.0) -> float:
  pred, gt = _pair(pred, gt)
  fix = gt > threshold
  if not fix.any():
    return float("nan")
  if np.ptp(pred) == 0:
    return 0.0  # A constant map standardises to 0 everywhere: chance level.
  z = (pred - pred.mean()) / pred.std(ddof=1)
  return float(z[fix].mean())


def auc_judd(pred, gt, threshold: float = 0.0) -> float:
  pred, gt = _pair(pred, gt)
  s, fix = pred.ravel(), gt.ravel() > threshold
  n_fix, n_other = int(fix.sum()), int((~fix).sum())
  if n_fix == 0 or n_other == 0:
    return float("nan")  # TPR or FPR has no denominator.
  s_fix, s_other = np.sort(s[fix]), np.sort(s[~fix])
  thresholds = np.unique(s_fix)[::-1]  # Distinct, descending: see "AUC-Judd ties" above.
  tp = (n_fix - np.searchsorted(s_fix, thresholds, side="left")) / n_fix  # share >= threshold
  fp = (n_other - np.searchsorted(s_other, thresholds, side="left")) / n_other
  tp, fp = np.concatenate([[0.0], tp, [1.0]]), np.concatenate([[0.0], fp, [1.0]])
  return float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1]) / 2))


def _scores(pred, true):
  pred, true = _finite("pred", pred), _finite("true", true)
  if pred.shape != true.shape or pred.ndim != 1:
    raise ValueError(f"expected two 1-D arrays of one length, got {pred.shape} and {true.shape}")
  if pred.size < 2:
    raise ValueError(f"a correlation needs at least 2 examples, got {pred.size}")
  return pred, true


def plcc(pred, true) -> float:
  return _pearson(*_scores(pred, true))


def srcc(pred, true) -> float:
  pred, true = _scores(pred, true)
  return _pearson(stats.rankdata(pred), stats.rankdata(true))  # Average ranks for ties.


def _mean(values):
  values = [v for v in values if not np.isnan(v)]
  return (float(np.mean(values)) if values else float("nan")), len(values)


def example_metrics(pred, gt, threshold: float = 0.0) -> dict:
  """One pair's row of the heatmap table: {"empty", "mse"} and, for a non-empty gt, each
  saliency metric (NaN where undefined). `heatmap_report` averages such rows; a job that streams
  its examples (eval_reward) computes them batch by batch and calls `summarize`."""
  p, g = _pair(pred, gt)
  row = {"empty": not bool((g > threshold).any()), "mse": mse(p, g)}
  if not row["empty"]:
    fns = {"cc": cc, "kld": kld, "sim": sim, "nss": lambda p, g: nss(p, g, threshold),
           "auc_judd": lambda p, g: auc_judd(p, g, threshold)}
    row.update({name: fns[name](p, g) for name in HEATMAP_METRICS})
  return row


def summarize(rows) -> dict:
  """`heatmap_report` of the rows of `example_metrics`."""
  empty = [r["empty"] for r in rows]
  report = {"n_all": len(rows), "n_empty": sum(empty), "n_nonempty": len(rows) - sum(empty)}
  report["mse_all"] = _mean([r["mse"] for r in rows])[0]
  report["mse_empty"] = _mean([r["mse"] for r in rows if r["empty"]])[0]
  for name in HEATMAP_METRICS:
    report[name], report[f"n_{name}"] = _mean([r[name] for r in rows if not r["empty"]])
  return report


def heatmap_report(preds, gts, threshold: float = 0.0) -> dict:
  """RAHF's heatmap table over pairs (a list, maps may differ in size, or [N, H, W] arrays).

  "mse_all" / "mse_empty": mean MSE over all examples / those with an empty gt; each saliency
  metric: mean over the examples with a non-empty gt (some gt > threshold) where it is defined
  (not NaN: see the module's edge cases). Counts: "n_all", "n_empty", "n_nonempty", and
  "n_<metric>" for each saliency metric. A mean over nothing is NaN.
  """
  if len(preds) != len(gts):
    raise ValueError(f"{len(preds)} predictions but {len(gts)} ground truths")
  rows = []
  for i, (p, g) in enumerate(zip(preds, gts)):
    try:
      rows.append(example_metrics(p, g, threshold))
    except ValueError as e:
      raise ValueError(f"example {i}: {e}") from None
  return summarize(rows)


def score_report(preds, trues) -> dict:
  pred, true = _scores(preds, trues)
  return {"plcc": plcc(pred, true), "srcc": srcc(pred, true), "n": int(pred.size)}
