"""RAHF's evaluation metrics (fnf_jax/rewards/heatmap_metrics.py): hand-computed cases, scipy for
the correlations, two independent routes for AUC-Judd, and the documented edge cases."""

import math

import numpy as np
import pytest
from scipy import stats

from fnf_jax.rewards import heatmap_metrics as hm

EPS = 2.2204e-16
NAN = float("nan")


def _blob_gt(rng, size=12):
  """A continuous ground truth with an exact-zero background (as RAHF's are)."""
  yy, xx = np.mgrid[:size, :size]
  cy, cx = rng.uniform(3, size - 3, 2)
  g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
  return np.where(g > 0.2, g, 0.0)


# ---- hand-computed cases ------------------------------------------------------------------


def test_mse_by_hand():
  # differences 0, 1, -0.5, 0 -> squares 0, 1, 0.25, 0 -> mean 1.25 / 4
  assert hm.mse([[0, 1], [0.5, 0.5]], [[0, 0], [1, 0.5]]) == pytest.approx(0.3125)


def test_cc_by_hand():
  # p - 2.5 = -1.5 -.5 .5 1.5; g - .25 = -.25 -.25 -.25 .75
  # sum products 1.5; sum p^2 5; sum g^2 .75 -> 1.5 / sqrt(3.75) = sqrt(0.6)
  assert hm.cc([[1, 2], [3, 4]], [[0, 0], [0, 1]]) == pytest.approx(math.sqrt(0.6))


def test_kld_by_hand():
  # uniform prediction .25 each, gt all on one pixel: 1 * log(1 / .25) = log 4
  assert hm.kld(np.ones((2, 2)), [[1, 0], [0, 0]]) == pytest.approx(math.log(4))
  # P = .25 .75 0 0, G = .5 .5 0 0: .5 log(.5/.25) + .5 log(.5/.75) = .5 log(4/3)
  assert hm.kld([[1, 3], [0, 0]], [[1, 1], [0, 0]]) == pytest.approx(0.5 * math.log(4 / 3))
  # all-zero prediction stays zero: log(eps + 1 / eps), finite but huge (~36.04)
  assert hm.kld(np.zeros((2, 2)), [[1, 0], [0, 0]]) == pytest.approx(math.log(EPS + 1 / EPS))


def test_sim_by_hand():
  # P = .25 .75 0 0, G = .5 .5 0 0: min .25 + .5 = .75
  assert hm.sim([[1, 3], [0, 0]], [[1, 1], [0, 0]]) == pytest.approx(0.75)
  # uniform .25 vs G = 1 0 0 0: .25
  assert hm.sim(np.ones((2, 2)), [[1, 0], [0, 0]]) == pytest.approx(0.25)
  assert hm.sim(np.zeros((2, 2)), [[1, 0], [0, 0]]) == 0.0


def test_nss_by_hand():
  # mean 2.5, std (N - 1) = sqrt(5 / 3); fixation at 4: 1.5 / sqrt(5/3) = sqrt(1.35)
  pred = [[1, 2], [3, 4]]
  assert hm.nss(pred, [[0, 0], [0, 1]]) == pytest.approx(math.sqrt(1.35))
  # fixations at 3 and 4 (continuous gt, > 0): mean(.5, 1.5) / sqrt(5/3) = sqrt(0.6)
  assert hm.nss(pred, [[0, 0], [0.5, 1]]) == pytest.approx(math.sqrt(0.6))
  # threshold .6 keeps only the pixel at 4
  assert hm.nss(pred, [[0, 0], [0.5, 1]], threshold=0.6) == pytest.approx(math.sqrt(1.35))


def test_auc_judd_by_hand():
  # fixations at values 3 and 1, others 2 and 0.
  # threshold 3: TPR 1/2, FPR 0/2; threshold 1: TPR 2/2, FPR 1/2 (the 2).
  # points (0,0) (0,.5) (.5,1) (1,1): 0 + .5 * (.5 + 1) / 2 + .5 * 1 = .875
  assert hm.auc_judd([[3, 2], [1, 0]], [[1, 0], [0.3, 0]]) == pytest.approx(0.875)
  # ties: fixations 1, 1; others 1, 0. One distinct threshold 1: TPR 1, FPR 1/2.
  # points (0,0) (.5,1) (1,1): .25 + .5 = .75
  assert hm.auc_judd([[1, 1], [1, 0]], [[1, 1], [0, 0]]) == pytest.approx(0.75)


# ---- against independent computations ------------------------------------------------------


def test_plcc_srcc_match_scipy():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=50), rng.normal(size=50)
  y = y + x
  assert hm.plcc(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
  assert hm.srcc(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
  xt, yt = np.round(x), np.round(y * 2) / 2  # many ties: average ranks
  assert hm.srcc(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0], abs=1e-12)
  assert hm.plcc(xt, yt) == pytest.approx(stats.pearsonr(xt, yt)[0], abs=1e-12)
  assert hm.score_report(x, y) == pytest.approx(
      {"plcc": stats.pearsonr(x, y)[0], "srcc": stats.spearmanr(x, y)[0], "n": 50})


def test_cc_matches_pearsonr():
  rng = np.random.default_rng(1)
  for _ in range(5):
    pred, gt = rng.uniform(size=(7, 9)), _blob_gt(rng, 9)[:7]
    if not gt.any():
      continue
    assert hm.cc(pred, gt) == pytest.approx(stats.pearsonr(pred.ravel(), gt.ravel())[0],
                                            abs=1e-12)


def _auc_judd_matlab(s_map, f_map):
  """A literal port of AUC_Judd.m's loop (jitter off): right when fixation values are distinct."""
  s, f = s_map.ravel(), f_map.ravel()
  sth = s[f > 0]
  n_fix, n_pix = len(sth), len(s)
  tp, fp = np.zeros(n_fix + 2), np.zeros(n_fix + 2)
  tp[-1] = fp[-1] = 1
  for i, thresh in enumerate(sorted(sth, reverse=True), start=1):
    above = np.sum(s >= thresh)
    tp[i] = i / n_fix
    fp[i] = (above - i) / (n_pix - n_fix)
  return float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1]) / 2))


def _auc_judd_rank_sum(s_map, f_map):
  """Mann-Whitney ROC area plus AUC-Judd's interpolation bonus, for distinct values.

  Judd's curve joins consecutive fixation thresholds by straight lines, so each non-fixated
  pixel strictly above the lowest fixation value is credited half a fixation step (1 / (2 Nfix))
  more than its Mann-Whitney share (the fixations above it); pixels below all fixations are not.
  AUC-Judd = U / (Nfix Nother) + #(other > min fixation) / (2 Nfix Nother).
  """
  s, f = s_map.ravel(), f_map.ravel() > 0
  n_fix, n_other = f.sum(), (~f).sum()
  ranks = stats.rankdata(s)
  u = ranks[f].sum() - n_fix * (n_fix + 1) / 2
  bonus = np.sum(s[~f] > s[f].min()) / (2 * n_fix * n_other)
  return float(u / (n_fix * n_other) + bonus)


def test_auc_judd_independent_routes():
  rng = np.random.default_rng(2)
  for _ in range(10):
    gt = _blob_gt(rng)
    pred = 0.5 * gt + rng.uniform(size=gt.shape)  # continuous: distinct values a.s.
    got = hm.auc_judd(pred, gt)
    assert got == pytest.approx(_auc_judd_matlab(pred, gt), abs=1e-12)
    assert got == pytest.approx(_auc_judd_rank_sum(pred, gt), abs=1e-12)
    assert 0.5 < got < 1.0


def test_perfect_prediction():
  gt = _blob_gt(np.random.default_rng(3))
  assert 0 < (gt > 0).sum() < gt.size
  assert hm.cc(gt, gt) == pytest.approx(1.0)
  assert hm.kld(gt, gt) == pytest.approx(0.0, abs=1e-12)
  assert hm.sim(gt, gt) == pytest.approx(1.0)
  assert hm.auc_judd(gt, gt) == 1.0
  assert hm.nss(gt, gt) > 0
  assert hm.mse(gt, gt) == 0.0


# ---- edge cases -----------------------------------------------------------------------------


def test_empty_ground_truth_is_nan():
  pred, empty = np.random.default_rng(4).uniform(size=(3, 3)), np.zeros((3, 3))
  for fn in (hm.cc, hm.kld, hm.sim, hm.nss, hm.auc_judd):
    assert math.isnan(fn(pred, empty)), fn.__name__
  assert hm.mse(pred, empty) == pytest.approx(np.mean(pred ** 2))
  # nothing above the threshold is empty too, for the fixation-based metrics
  assert math.isnan(hm.nss(pred, np.full((3, 3), 0.1), threshold=0.5))


@pytest.mark.parametrize("value", [0.0, 0.3])
def test_constant_prediction_scores_chance(value):
  pred, gt = np.full((3, 3), value), np.zeros((3, 3))
  gt[0, 0], gt[1, 2] = 1.0, 0.4
  assert hm.cc(pred, gt) == 0.0
  assert hm.nss(pred, gt) == 0.0
  assert hm.auc_judd(pred, gt) == 0.5
  # the ordinary definitions still apply: uniform P (1/9) vs G = (1, .4) / 1.4
  if value:
    assert hm.sim(pred, gt) == pytest.approx(2 / 9)
    assert hm.kld(pred, gt) == pytest.approx(
        sum(g / 1.4 * math.log(g / 1.4 * 9) for g in (1.0, 0.4)))


def test_degenerate_ground_truth_is_nan():
  pred = np.random.default_rng(5).uniform(size=(3, 3))
  full = np.full((3, 3), 0.5)  # every pixel fixated, constant
  assert math.isnan(hm.cc(pred, full))
  assert math.isnan(hm.auc_judd(pred, full))  # no non-fixated pixels: FPR undefined
  assert hm.nss(pred, full) == pytest.approx(0.0, abs=1e-12)  # mean of a standardised map
  assert hm.sim(pred, full) == pytest.approx(np.minimum(pred / pred.sum(), 1 / 9).sum())


def test_constant_scores():
  x = np.array([0.1, 0.5, 0.2, 0.9])
  c = np.full(4, 0.7)
  assert hm.plcc(c, x) == 0.0 and hm.srcc(c, x) == 0.0  # constant prediction: chance
  assert math.isnan(hm.plcc(x, c)) and math.isnan(hm.srcc(x, c))  # constant truth
  assert math.isnan(hm.plcc(c, c))


def test_invalid_inputs_raise():
  a, b = np.zeros((2, 3)), np.zeros((3, 2))
  with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
    hm.cc(a, b)
  with pytest.raises(ValueError, match="NaN"):
    hm.kld([[NAN, 0], [0, 0]], np.ones((2, 2)))
  with pytest.raises(ValueError, match="NaN"):
    hm.mse(np.ones((2, 2)), [[0, 0], [NAN, 0]])
  with pytest.raises(ValueError, match=">= 0"):
    hm.sim(-np.ones((2, 2)), np.ones((2, 2)))
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    hm.nss(np.ones((2, 2)), 2 * np.ones((2, 2)))
  with pytest.raises(ValueError, match="H, W"):
    hm.auc_judd(np.ones((2, 2, 2)), np.ones((2, 2, 2)))
  with pytest.raises(ValueError, match="empty"):
    hm.mse(np.zeros((0, 2)), np.zeros((0, 2)))
  with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
    hm.plcc([1, 2, 3], [1, 2, 3, 4])
  with pytest.raises(ValueError, match="NaN"):
    hm.srcc([1, NAN, 3], [1, 2, 3])
  with pytest.raises(ValueError, match="at least 2"):
    hm.score_report([1.0], [2.0])
  with pytest.raises(ValueError, match=r"example 1: pred shape \(2, 3\) != gt shape \(3, 2\)"):
    hm.heatmap_report([a, a], [a, b])
  with pytest.raises(ValueError, match="2 predictions but 1"):
    hm.heatmap_report([a, a], [a])


# ---- aggregation ----------------------------------------------------------------------------


def test_heatmap_report_mixed_set():
  p1, g1 = np.array([[1, 2], [3, 4.0]]), np.array([[0, 0], [0, 1.0]])
  p2, g2 = np.array([[3, 2], [1, 0.0]]), np.array([[1, 0], [0.3, 0]])
  p3, g3 = np.array([[0.5, 0], [0, 0.5]]), np.zeros((2, 2))  # empty gt: mse (.25 + .25) / 4
  p4, g4 = np.zeros((3, 3)), np.zeros((3, 3))  # empty gt, other size: mse 0
  p5, g5 = np.array([[1, 0], [0, 0.0]]), np.full((2, 2), 0.5)  # constant gt: cc, auc NaN
  r = hm.heatmap_report([p1, p2, p3, p4, p5], [g1, g2, g3, g4, g5])
  assert (r["n_all"], r["n_empty"], r["n_nonempty"]) == (5, 2, 3)
  mses = [hm.mse(p, g) for p, g in ((p1, g1), (p2, g2), (p3, g3), (p4, g4), (p5, g5))]
  assert r["mse_all"] == pytest.approx(np.mean(mses))
  assert r["mse_empty"] == pytest.approx((0.125 + 0.0) / 2)
  # cc: sqrt(.6) (hand case above) and cc(p2, g2); p5's NaN is left out and counted out
  assert r["cc"] == pytest.approx((math.sqrt(0.6) + hm.cc(p2, g2)) / 2) and r["n_cc"] == 2
  assert r["auc_judd"] == pytest.approx((1.0 + 0.875) / 2) and r["n_auc_judd"] == 2
  for name in ("kld", "sim", "nss"):
    fn = getattr(hm, name)
    assert r[name] == pytest.approx(np.mean([fn(p1, g1), fn(p2, g2), fn(p5, g5)]))
    assert r[f"n_{name}"] == 3
  # an [N, H, W] array works the same, and a set with no empty gt has mse_empty NaN
  r2 = hm.heatmap_report(np.stack([p1, p2]), np.stack([g1, g2]))
  assert (r2["n_empty"], r2["n_nonempty"]) == (0, 2) and math.isnan(r2["mse_empty"])
  assert r2["auc_judd"] == pytest.approx(0.9375)
