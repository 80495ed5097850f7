"""The paper's claim on the toy world, end to end: `make demo`'s command at a reduced budget.

Runs `python -m fnf_jax.main --config=configs/toy.py:runlocal` in a subprocess (one CPU device, XLA's
default optimisation, as `make demo` runs) on the shipped toy model and reward, then checks what
the judge says. Seeds are fixed, so the numbers are the same on every run of this machine type.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "Comparable defect reduction": Focus-N-Fix removes at least half as much of the base model's
# defect rate as DRaFT does.
COMPARABLE = 0.5


@pytest.fixture(scope="module")
def metrics(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "fnf_jax.main", "--config=configs/toy.py:runlocal",
       f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "| Focus-N-Fix" in proc.stdout  # the summary table is printed
  assert os.path.isfile(os.path.join(workdir, "report", "index.html"))
  assert os.path.isfile(os.path.join(workdir, "report", "grid.png"))
  assert os.path.isfile(os.path.join(workdir, "report", "ab", "key.json"))
  with open(os.path.join(workdir, "report", "metrics.json")) as f:
    return dict(json.load(f), workdir=str(workdir))


def test_metrics_json_has_every_method_and_field(metrics):
  # The eval job's metrics (fnf_jax/jobs/evaluate.py), the toy judge's measures among them.
  assert metrics["judge"]["name"] == "toy"
  for method in ("base", "draft", "fnf"):
    for key in ("problem_rate", "psnr_outside", "ssim_outside", "change_inside",
                "judge/prompt_fidelity", "reward/target"):
      assert key in metrics["methods"][method], (method, key)


def test_focus_n_fix_fixes_defects_locally(metrics):
  # Copies: the module's `metrics` fixture is also compared whole with the eval job's numbers.
  base, draft, fnf = (dict(metrics["methods"][m]) for m in ("base", "draft", "fnf"))
  for m in (base, draft, fnf):
    m["defect_rate"] = m["problem_rate"]
    m["prompt_fidelity"] = m["judge/prompt_fidelity"]["mean"]
  summary = json.dumps(metrics["methods"])
  # Focus-N-Fix lowers the judge's defect rate against the base model ...
  assert fnf["defect_rate"] < base["defect_rate"], summary
  # ... by about as much as DRaFT ...
  assert base["defect_rate"] - fnf["defect_rate"] >= COMPARABLE * (
      base["defect_rate"] - draft["defect_rate"]), summary
  # ... while changing the image outside the mask less ...
  assert fnf["psnr_outside"] > draft["psnr_outside"], summary
  assert fnf["ssim_outside"] >= draft["ssim_outside"], summary
  # ... and with the prompt still drawn: DRaFT's reward hacking erases or recolours shapes.
  # (Against the base model Focus-N-Fix's fidelity is a little lower in this toy world:
  # judge/prompt_fidelity's change in metrics.json, reported in the README, not asserted.)
  assert fnf["prompt_fidelity"] > draft["prompt_fidelity"], summary


@pytest.mark.slow  # ~1 min more (a second sampling of the held-out examples): `make test-slow`
def test_the_eval_job_on_the_demo_runs_gives_the_demo_numbers(metrics, tmp_path):
  # The demo evaluates with the eval job's code and its in-memory LoRAs; the eval job reads the
  # LoRAs back from the runs' checkpoints. Same config, same x_T: the same numbers, exactly.
  workdir = metrics["workdir"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  runs = f'("draft={workdir}/draft", "fnf={workdir}/fnf")'
  proc = subprocess.run(
      [sys.executable, "-m", "fnf_jax.main", "--config=configs/toy.py:runlocal",
       "--config.job=eval", f"--config.eval.runs={runs}", f"--workdir={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(tmp_path / "report" / "metrics.json") as f:
    evaluated = json.load(f)
  for method, numbers in metrics["methods"].items():
    numbers = {k: v for k, v in numbers.items() if k != "train_seconds"}
    assert evaluated["methods"][method] == numbers, method
  with open(os.path.join(workdir, "report", "grid.png"), "rb") as a, open(
      tmp_path / "report" / "grid.png", "rb") as b:
    assert a.read() == b.read()
