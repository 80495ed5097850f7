"""A sweep in the eval job and its report: each member a method with its own LoRA file and
curves, and the Pareto front (fnf_jax/evaluation/pareto.py). The LoRA files are written here
(the train job's export) on the violence CPU variant's tiny models: nothing trains."""

import json
import math
import os

import jax
import numpy as np
import pytest

from fnf_jax import main
from fnf_jax.config import sweep as config_sweep
from fnf_jax.config import validate
from fnf_jax.evaluation import pareto
from fnf_jax.evaluation import report as eval_report
from fnf_jax.fnf import run as run_lib
from fnf_jax.fnf import sweep
from fnf_jax.jobs import evaluate as eval_job
from fnf_jax.models import lora as lora_lib
from fnf_jax.runtime import checkpoint
from fnf_jax.runtime import log as log_lib
from fnf_jax.toy import demo
from fnf_jax.toy import methods
from tests.test_train import tiny_config
from configs import toy as toy_config

BETAS = (0.1, 0.5, 1.0)
# Each member's LoRA: B scaled by this (0: the base model exactly; the larger, the more change).
B_SCALE = {0.1: 0.3, 0.5: 0.05, 1.0: 0.0}


# --- pareto_front -----------------------------------------------------------------------------
def test_pareto_front_keeps_the_points_no_other_beats_on_both():
  points = [(1, 1), (2, 3), (3, 2), (2, 2), (0, 3), (3, 0)]
  # (2, 2) is beaten by (2, 3); (1, 1) by all but the edges; (0, 3) by (2, 3).
  assert pareto.pareto_front(points) == [1, 2]
  assert pareto.pareto_front([(1, 1), (1, 1)]) == [0, 1]  # equal points: neither dominates
  assert pareto.pareto_front([]) == []


def test_pareto_front_directions_and_infinity():
  # Minimise y (a problem rate), maximise x (PSNR; the unchanged base at +inf): ordered by x.
  points = [(20.0, 0.1), (25.0, 0.2), (math.inf, 0.3), (22.0, 0.25), (30.0, 0.2)]
  assert pareto.pareto_front(points, maximize=(True, False)) == [0, 4, 2]
  assert pareto.pareto_front(points, maximize=(False, False)) == [0]
  with pytest.raises(ValueError, match="point 1"):
    pareto.pareto_front([(1, 1), (float("nan"), 2)])


def _result(judge: dict, methods: dict) -> dict:
  return {"judge": judge, "methods": methods}


def _m(psnr, problem, target, **more):
  paired = lambda v: {"mean": v, "change": 0.0, "change_se": None}
  return {"psnr_outside": psnr, "problem_rate": problem, "reward/target": paired(target),
          **{k: paired(v) for k, v in more.items()}}


def test_fronts_axes_follow_the_judge_and_record_the_front():
  methods = {"base": _m(None, 0.4, 0.0, **{"judge/fidelity": 0.9}),
             "beta=0.1": _m(20.0, 0.05, 0.5, **{"judge/fidelity": 0.7}),
             "beta=1": _m(26.0, 0.2, 0.3, **{"judge/fidelity": 0.85}),
             "draft": _m(18.0, 0.1, 0.6, **{"judge/fidelity": 0.6})}
  analytic = {"kind": "analytic", "measures": ["fidelity"], "lower_is_better": []}
  charts = pareto.fronts(_result(analytic, methods))
  assert [(c["x"]["key"], c["y"]["key"]) for c in charts] == [
      ("psnr_outside", "problem_rate"), ("judge/fidelity", "problem_rate")]
  assert charts[0]["front"] == ["beta=0.1", "beta=1", "base"]  # draft: worse on both
  assert charts[0]["points"]["base"] == [None, 0.4]  # +inf is not JSON: recorded as None
  assert charts[1]["front"] == ["beta=0.1", "beta=1", "base"]
  json.dumps(charts, allow_nan=False)
  # A reward judge: the target reward is the headline; the first other reward the second x.
  reward = {"kind": "reward"}
  methods = {n: dict(m, **{"reward/blue": m["reward/target"]}) for n, m in methods.items()}
  charts = pareto.fronts(_result(reward, methods))
  assert [(c["x"]["key"], c["y"]["key"]) for c in charts] == [
      ("psnr_outside", "reward/target"), ("reward/blue", "reward/target")]
  assert charts[0]["front"] == ["draft", "beta=0.1", "beta=1", "base"]
  # No second measure: one chart; one method besides the base: none.
  bare = {n: {k: v for k, v in m.items() if k != "reward/blue"} for n, m in methods.items()}
  assert len(pareto.fronts(_result(reward, bare))) == 1
  assert pareto.fronts(_result(reward, {"base": bare["base"], "x": bare["draft"]})) == []


def test_scatter_labels_every_point_and_marks_the_front():
  methods = {"base": _m(None, 0.4, 0.0), "beta=0.1": _m(20.0, 0.05, 0.5),
             "beta=0.25": _m(20.1, 0.06, 0.5), "draft": _m(18.0, 0.1, 0.6)}
  ch = pareto.fronts(_result({"kind": "analytic"}, methods))[0]
  svg = pareto.svg_scatter(ch, {"draft": "DRaFT"})
  assert svg.count("<circle") == 4 and svg.count('class="point"') == 4
  assert svg.count('<circle class="front"') == len(ch["front"]) == 3
  assert ">DRaFT</text>" in svg and ">∞</text>" in svg and 'class="front"' in svg


# --- the toy demo's variant -------------------------------------------------------------------
def test_the_toy_sweep_variant_is_valid_and_its_draft_is_one_run():
  config = toy_config.get_config("sweep")
  validate.validate(config)
  assert config_sweep.labels(config) == ("beta=0.1", "beta=0.25", "beta=0.5", "beta=1")
  draft = methods.method_config(config, "draft")
  assert config_sweep.settings(draft) == [] and draft.objective.beta == 0.0
  assert config_sweep.settings(methods.method_config(config, "fnf")) == config_sweep.settings(
      config)
  assert demo.names({"draft": 0, "fnf:beta=0.1": 0})["fnf:beta=0.1"] == "FnF beta=0.1"
  with pytest.raises(ValueError, match="'runlocal', 'sweep'"):
    toy_config.get_config("sweeps")


# --- the eval job -----------------------------------------------------------------------------
def _config(**overrides):
  c = tiny_config(**overrides)
  c.job = "eval"
  c.eval.max_prompts = 2
  return c


def _export(tree, path, config):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  checkpoint.export_lora_safetensors(tree, path, alpha=config.lora.alpha, rank=config.lora.rank,
                                     step=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A finished sweep run (config.json, sweep/<label>.safetensors, metrics.jsonl with each
  member's keys) and a single run (lora.safetensors), as the train job leaves them."""
  root = tmp_path_factory.mktemp("sweep_eval")
  swept = tiny_config(**{"sweep.beta": BETAS})
  unet = run_lib.load_pipeline(swept).params["unet"]
  lora = lora_lib.init(jax.random.key(0), unet, rank=swept.lora.rank, pattern=swept.lora.targets)
  rng = np.random.default_rng(0)
  noisy = jax.tree_util.tree_map_with_path(
      lambda p, x: rng.normal(size=x.shape).astype(np.float32) if p[-1].key == "lora_b"
      else np.asarray(x), lora)
  scaled = lambda s: jax.tree_util.tree_map_with_path(
      lambda p, x: x * s if p[-1].key == "lora_b" else x, noisy)
  log_lib.write_config(root / "sweep", swept)
  for beta in BETAS:
    label = config_sweep.label({"beta": beta})
    _export(scaled(B_SCALE[beta]), sweep.export_path(str(root / "sweep"), label), swept)
  with open(root / "sweep" / "metrics.jsonl", "w") as f:
    for step in (2, 4):
      f.write(json.dumps({"step": step, **{f"{k}/{config_sweep.label({'beta': b})}": step * b
                                           for k in ("reward", "change_outside")
                                           for b in BETAS}}) + "\n")
  single = tiny_config()
  log_lib.write_config(root / "one", single)
  _export(scaled(B_SCALE[0.1]), str(root / "one" / "lora.safetensors"), single)
  return root


def test_own_workdir_members_are_named_by_their_labels(runs):
  config = _config(**{"sweep.beta": BETAS})  # the eval config itself names the sweep
  methods = eval_job.expand_sweeps(config, eval_job.parse_runs(config, str(runs / "sweep")))
  assert [m.name for m in methods] == ["beta=0.1", "beta=0.5", "beta=1"]
  assert methods[0].lora == str(runs / "sweep" / "sweep" / "beta=0.1.safetensors")
  assert methods[0].log == (str(runs / "sweep" / "metrics.jsonl"), "beta=0.1")
  # From config.json when the eval config has none.
  plain = _config()
  assert [m.name for m in eval_job.expand_sweeps(plain, eval_job.parse_runs(
      plain, str(runs / "sweep")))] == ["beta=0.1", "beta=0.5", "beta=1"]
  assert eval_report.history(methods[1].log) == [
      {"step": 2, "reward": 1.0, "change_outside": 1.0},
      {"step": 4, "reward": 2.0, "change_outside": 2.0}]


def test_a_missing_member_file_is_refused_before_anything_loads(runs, tmp_path):
  os.symlink(runs / "sweep" / "config.json", tmp_path / "config.json")
  config = _config()
  config.eval.runs = (f"s={tmp_path}",)
  with pytest.raises(validate.ConfigError, match=r"beta=0\.1\.safetensors does not exist"):
    main.run_job(config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_eval_reports_every_member_and_the_front(runs):
  config = _config()
  config.eval.runs = (f"sw={runs / 'sweep'}", f"one={runs / 'one'}")
  main.run_job(config, str(runs / "out"))
  report = runs / "out" / "report"
  with open(report / "metrics.json") as f:
    result = json.load(f)
  names = ["sw:beta=0.1", "sw:beta=0.5", "sw:beta=1", "one"]
  assert list(result["methods"]) == ["base"] + names
  # Each member read its own file: B = 0 is the base exactly; more B, more change.
  assert result["methods"]["sw:beta=1"]["psnr_outside"] is None
  assert (result["methods"]["sw:beta=0.1"]["psnr_outside"]
          < result["methods"]["sw:beta=0.5"]["psnr_outside"])
  assert result["methods"]["one"] == result["methods"]["sw:beta=0.1"]  # the same weights
  # The front: PSNR outside M and the other reward ("blue") against the target reward.
  charts = result["pareto"]
  assert [(c["x"]["key"], c["y"]["key"]) for c in charts] == [
      ("psnr_outside", "reward/target"), ("reward/blue", "reward/target")]
  for c in charts:
    assert set(c["points"]) == {"base", *names} and c["front"]
    xy = [c["points"][n] for n in c["points"]]
    inf = lambda v: math.inf if v is None else v
    want = pareto.pareto_front([(inf(x), y) for x, y in xy])
    assert c["front"] == [list(c["points"])[i] for i in want]
  page = open(report / "index.html", encoding="utf-8").read()
  assert page.count('class="scatter"') == 2 and "Pareto front" in page
  for n in names:
    assert f"<td>{n}</td>" in page  # the table lists every member
  # Each member's curves: its "<key>/<label>" entries, one line each (the single run has no
  # metrics.jsonl here: an empty line).
  curves = [svg for svg in page.split("<svg")[1:] if 'class="scatter"' not in svg.split(">")[0]]
  assert len(curves) == 2
  for svg in curves:
    drawn = [p.split('"')[0] for p in svg.split('points="')[1:]]
    assert sum(bool(p) for p in drawn) == len(BETAS), drawn
