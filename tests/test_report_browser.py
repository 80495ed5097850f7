"""The eval report opened in a real headless Chromium (tools/browser_check.py): the tables, the
images and the charts render and the console stays clean. Skips where Debian's chromium and
chromium-driver are not installed (.ci/run installs them)."""

import json
import os
import sys

import numpy as np
import pytest

from fnf_jax.jobs import evaluate as eval_job
from fnf_jax.evaluation import report as eval_report
from fnf_jax.data import examples as examples_lib
from fnf_jax.toy import demo
from fnf_jax.toy import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import browser_check  # noqa: E402  pylint: disable=g-import-not-at-top
import toy as toy_config  # noqa: E402  pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.skipif(browser_check.available() is not None,
                                reason=str(browser_check.available()))


@pytest.fixture
def report(tmp_path):
  """A toy report of 6 examples in two categories, base and two methods, with curves."""
  n = 6
  rng = np.random.default_rng(0)
  data = world.batch(range(n), defect_rate=0.5)
  out = {"reference": data["image"], "mask": np.zeros((n, 32, 32), np.float32)}
  out["mask"][1, 4:12, 4:12] = 1.0
  for m in ("base", "draft", "fnf"):
    if m != "base":
      out[f"images/{m}"] = np.clip(data["image"] + rng.normal(0, 0.05, data["image"].shape), 0, 1)
    out[f"score/target/{m}"] = rng.normal(size=n).astype(np.float32)
  examples = [examples_lib.Example(i, c, i) for i, c in enumerate(data["caption"])]
  categories = {c: ("red things" if "red" in c else "others",) for c in data["caption"]}
  result = eval_job.metrics(toy_config.get_config(), out, ["draft", "fnf"], examples, categories)
  log = tmp_path / "fnf.jsonl"
  log.write_text("".join(json.dumps({"step": s, "reward": -1 / s, "change_outside": s / 100})
                         + "\n" for s in (5, 10, 15)))
  folder = eval_report.write(str(tmp_path / "report"), result, out, examples,
                             {"fnf": str(log), "draft": str(log)}, rows=3, seed=0,
                             labels=demo.NAMES, title="toy report")
  return folder, result


def test_the_report_renders_in_chromium(report):
  folder, result = report
  found = browser_check.check(os.path.join(folder, "index.html"))
  assert found["errors"] == [], found["console"]
  assert found["title"] == "toy report"
  summary = found["tables"][0]
  assert summary["header"][0] == "method" and "prompt fidelity (judge)" in summary["header"]
  assert [row[0] for row in summary["body"]] == ["base", "DRaFT", "Focus-N-Fix"]
  assert summary["columns"] == len(eval_report.columns(result)) + 1
  assert len(found["tables"]) == 1 + len(result["categories"])  # one table per category
  shown = {i["src"]: i for i in found["images"]}
  assert set(shown) == {"grid.png", "categories.png"}
  grid = eval_report.grid(np.zeros((12, 32, 32, 3)), cols=4, scale=4)  # 3 rows x 4 columns
  assert (shown["grid.png"]["height"], shown["grid.png"]["width"]) == grid.shape[:2]
  assert found["charts"] == 4  # two curves, each with both runs


MEMBERS = ("draft", "fnf:beta=0.1", "fnf:beta=0.25", "fnf:beta=0.5", "fnf:beta=1")


@pytest.fixture
def sweep_report(tmp_path):
  """A toy report of a sweep: four members, DRaFT and the base, each member's curves from one
  metrics.jsonl ("<key>/<label>"), so with the Pareto front's two scatters."""
  n = 8
  rng = np.random.default_rng(1)
  data = world.batch(range(n), defect_rate=0.5)
  out = {"reference": data["image"], "mask": np.zeros((n, 32, 32), np.float32)}
  out["mask"][:, 8:16, 8:16] = 1.0
  out["score/target/base"] = rng.normal(size=n).astype(np.float32)
  dark = data["image"].max(-1) < 0.5  # the blotches, by the toy judge's rule
  defective = [i for i in range(n) if dark[i].sum() >= 6]
  # DRaFT fixes as many as the smallest β with more change; a larger β fixes fewer, changes less.
  for k, (m, fixes) in enumerate(zip(MEMBERS, (4, 4, 3, 2, 1))):
    images = data["image"].copy()
    for i in defective[:fixes]:
      images[i][dark[i]] = 0.9
    noise = rng.normal(0, 0.01 * (len(MEMBERS) - k), data["image"].shape)
    out[f"images/{m}"] = np.clip(images + noise, 0, 1)
    out[f"score/target/{m}"] = out["score/target/base"] + 0.3 * (len(MEMBERS) - k)
  examples = [examples_lib.Example(i, c, i) for i, c in enumerate(data["caption"])]
  result = eval_job.metrics(toy_config.get_config("sweep"), out, list(MEMBERS), examples, {})
  log = tmp_path / "fnf.jsonl"  # DRaFT's keys and the members' ("reward/beta=0.1", ...)
  log.write_text("".join(json.dumps({"step": s, "reward": -1 / s, "change_outside": s / 100, **{
      f"{k}/{m[4:]}": b / s for m, b in zip(MEMBERS[1:], (1, 2, 3, 4))
      for k in ("reward", "change_outside")}}) + "\n" for s in (5, 10, 15)))
  logs = {m: (str(log), m[4:]) for m in MEMBERS[1:]}
  folder = eval_report.write(str(tmp_path / "report"), result, out, examples,
                             {"draft": str(log), **logs}, rows=3, seed=0,
                             labels=demo.names(dict.fromkeys(MEMBERS)), title="sweep report")
  return folder, result


def test_the_sweep_report_draws_the_pareto_front(sweep_report):
  folder, result = sweep_report
  found = browser_check.check(os.path.join(folder, "index.html"))
  assert found["errors"] == [], found["console"]
  rows = [row[0] for row in found["tables"][0]["body"]]
  assert rows == ["base", "DRaFT"] + [f"FnF beta={b}" for b in ("0.1", "0.25", "0.5", "1")]
  # Defect rate against PSNR outside M and against prompt fidelity (the toy judge's measure).
  assert len(found["scatters"]) == len(result["pareto"]) == 2, found["scatters"]
  for chart, drawn in zip(result["pareto"], found["scatters"]):
    assert drawn["title"] == f"{chart['y']['title']} against {chart['x']['title']}"
    assert sorted(p["label"] for p in drawn["points"]) == sorted(rows)
    assert sorted(t["text"] for t in drawn["labels"]) == sorted(rows)
    assert all(p["visible"] for p in drawn["points"] + drawn["labels"]), drawn
    assert drawn["label_overlaps"] == 0, drawn
    assert drawn["front_lines"] == 1
    shown = demo.names(dict.fromkeys(MEMBERS))
    assert sorted(p["label"] for p in drawn["points"] if p["front"]) == sorted(
        shown.get(m, m) for m in chart["front"])
  assert found["charts"] == 2 * 5  # the curves: two, of DRaFT's run and the four members


def test_a_missing_image_is_reported(report):
  folder, _ = report
  os.remove(os.path.join(folder, "grid.png"))
  found = browser_check.check(os.path.join(folder, "index.html"))
  assert any("grid.png" in e for e in found["errors"]), found["errors"]
