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
  with open(os.path.join(workdir, "report", "metrics.json")) as f:
    return json.load(f)


def test_metrics_json_has_every_method_and_field(metrics):
  for method in ("base", "draft", "fnf"):
    for key in ("defect_rate", "psnr_outside", "ssim_outside", "change_inside",
                "prompt_fidelity", "reward"):
      assert key in metrics[method], (method, key)


def test_focus_n_fix_fixes_defects_locally(metrics):
  base, draft, fnf = metrics["base"], metrics["draft"], metrics["fnf"]
  summary = json.dumps(metrics)
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
  # fidelity_change in metrics.json, reported in the README, not asserted.)
  assert fnf["prompt_fidelity"] > draft["prompt_fidelity"], summary
