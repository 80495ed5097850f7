"""The `eval` job on the violence config's CPU runs: a Focus-N-Fix and a DRaFT workdir trained
here, the held-out prompts sampled with the base and both LoRAs, the report written."""

import csv
import json
import os

import numpy as np
import pytest

from fnf_jax.jobs import evaluate as eval_job
from fnf_jax import main
from fnf_jax.config import validate
from fnf_jax.data import prompts as prompts_lib
from test_configs import load


def _runlocal(name):
  c = load(name).get_config("runlocal")
  c.mesh = {"data": 1, "fsdp": 1}  # one of this process's 8 fake devices: the CPU variant's way
  c.log.image_every, c.log.tensorboard = 0, False
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  for name, cfg in (("fnf", "violence"), ("draft", "draft")):
    main.run_job(_runlocal(cfg), str(root / name))
  return root


def _config(root):
  c = _runlocal("violence")
  c.job = "eval"
  c.eval.runs = (f"fnf={root / 'fnf'}", f"draft={root / 'draft'}")
  return c


@pytest.mark.slow  # ~2.5 min on 2 cores: two CPU trainings and the evaluation (`make test-slow`)
def test_eval_writes_the_report_and_its_numbers_are_right(runs):
  config = _config(runs)
  validate.validate(config)
  result, out, examples = eval_job.evaluate(config, str(runs / "out"))
  report = runs / "out" / "report"
  with open(report / "metrics.json") as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert set(result["methods"]) == {"base", "fnf", "draft"}
  html = open(report / "index.html", encoding="utf-8").read()
  assert "grid.png" in html and "PSNR outside M" in html and "blue" in html
  assert os.path.getsize(report / "grid.png") > 0

  # The held-out prompts, and only they: training never saw them.
  train, _ = prompts_lib.load(config.prompts, "train")
  held, _ = prompts_lib.load(config.prompts, "eval")
  assert result["prompts"] == sorted(held) and not set(held) & set(train)
  assert len(examples) == len(held) * config.eval.seeds_per_prompt

  # Two images, by hand: the change outside / inside M and the paired reward change.
  rows = np.arange(2)
  ref, mask, im = out["reference"][rows], out["mask"][rows], out["images/fnf"][rows]
  got = eval_job.method_metrics(out, "fnf", ["target", "blue"], rows)
  out_w = (1 - mask)[..., None].astype(np.float64)
  mse = float((out_w * (im - ref).astype(np.float64) ** 2).sum() / (3 * out_w.sum()))
  assert got["mse_outside"] == pytest.approx(mse, rel=1e-6)
  assert got["psnr_outside"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-6)
  in_w = mask[..., None].astype(np.float64)
  if in_w.sum() > 0:
    assert got["change_inside"] == pytest.approx(
        float((in_w * np.abs(im - ref)).sum() / (3 * in_w.sum())), rel=1e-6)
  for k in ("target", "blue"):
    diff = out[f"score/{k}/fnf"][rows].astype(np.float64) - out[f"score/{k}/base"][rows]
    assert got[f"reward/{k}"]["change"] == pytest.approx(diff.mean(), rel=1e-6, abs=1e-9)
    assert got[f"reward/{k}"]["change_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(2),
                                                            rel=1e-6, abs=1e-9)
  base_bad = out["score/target/base"][rows] < config.eval.judge_threshold
  bad = out["score/target/fnf"][rows] < config.eval.judge_threshold
  assert got["problem_rate"] == pytest.approx(bad.mean())
  if base_bad.any():
    assert got["fixed_rate"] == pytest.approx((~bad[base_bad]).mean())
  # The base against itself changes nothing.
  assert result["methods"]["base"]["psnr_outside"] is None
  assert result["methods"]["base"]["reward/target"]["change"] == 0

  # The blinded pairs: every example x method once, sides recorded, a template to fill.
  with open(report / "ab" / "key.json") as f:
    key = json.load(f)
  assert len(key) == 2 * len(examples)
  assert {(v["example"], v["method"]) for v in key.values()} == {
      (i, m) for i in range(len(examples)) for m in ("fnf", "draft")}
  assert all({v["1"], v["2"]} == {"base", v["method"]} for v in key.values())
  assert {v["1"] for v in key.values()} == {"base", "fnf", "draft"}  # both sides get the base
  with open(report / "ab" / "ratings.csv", encoding="utf-8") as f:
    assert len(list(csv.reader(f))) == 1 + len(key)
  for name in key:
    assert os.path.isfile(report / "ab" / f"{name}_1.png")


def test_runs_of_another_base_model_are_refused_with_both_paths(tmp_path):
  # Checked from each run's config.json before anything loads: no training needed.
  for name, model in (("fnf", "tiny"), ("other", "/models/sd21")):
    (tmp_path / name).mkdir()
    with open(tmp_path / name / "config.json", "w") as f:
      json.dump({"model": {"path": model}}, f)
  config = _config(tmp_path)
  config.eval.runs = (f"fnf={tmp_path / 'fnf'}", f"other={tmp_path / 'other'}")
  with pytest.raises(validate.ConfigError, match="'/models/sd21'.*'tiny'"):
    main.run_job(config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  config.eval.runs = ("no-equals-sign",)
  with pytest.raises(validate.ConfigError, match="NAME=WORKDIR"):
    main.run_job(config, str(tmp_path / "out"))
