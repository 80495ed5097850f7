"""train_reward / eval_reward (configs/rahf.py): the real loop on tiny models and tiny data.

A tiny RAHF on a mini RichHF-18K (tests/richhf_fixture.py: the maps are painted into the images,
so there is something to learn) lowers its loss and beats its untrained self on the held-out
split; the toy world's defect net trains through the same job; a run stopped by SIGTERM and
rerun ends bit for bit where an uninterrupted one ends, and so does one whose newest checkpoint
is broken (the shared loop, fnf_jax/runtime/loop.py, restores the one before).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from fnf_jax.runtime import checkpoint
from fnf_jax import main
from fnf_jax.runtime import loop as loop_lib
from fnf_jax.models import rahf as rahf_lib
from fnf_jax.toy import reward as toy_reward
from richhf_fixture import write_mini_richhf
from test_configs import ROOT, load
from test_train import read_metrics


def _eval(workdir, tag=""):
  with open(os.path.join(workdir, "eval", f"test{'-' + tag if tag else ''}.json")) as f:
    return json.load(f)


def _run(config, workdir):
  return main.run_job(config, str(workdir))


def _baseline(config, workdir):
  config.job, config.eval.weights = "eval_reward", "init"
  _run(config, workdir)
  return _eval(workdir, "init")


def _first_last(workdir, key="loss"):
  rows = read_metrics(workdir)
  return rows[min(rows)][key], rows[max(rows)][key]


def _main(workdir, *overrides: str) -> dict:
  """`python -m fnf_jax.main --config=configs/rahf.py:runlocal` as a user runs it, on one CPU
  device (the 8 fake devices of this process make each step ~8x slower; the sharded path is
  what the toy tests below run); returns the eval report it wrote."""
  proc = subprocess.run(
      [sys.executable, "-m", "fnf_jax.main", "--config=configs/rahf.py:runlocal",
       f"--workdir={workdir}", *overrides], cwd=ROOT, capture_output=True, text=True,
      # Optimisation level 1: its compile is ~15 s longer than level 0's, its steps ~2x faster.
      timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_"
                            "platform_device_count=1 --xla_backend_optimization_level=1"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow  # ~90 s (300 steps): `make test-slow`; the toy tests below train in `make test`
def test_tiny_rahf_learns_the_heatmaps_and_beats_its_untrained_self(tmp_path):
  manifest = write_mini_richhf(tmp_path / "manual", n_train=66, n_dev=4, n_test=24, seed=1)
  manual = f"--config.data.manual_dir={tmp_path / 'manual'}"
  proc = _main(tmp_path / "run", manual)
  assert "step 300/300" in proc.stderr  # the progress line
  report = _eval(tmp_path / "run")
  first, last = _first_last(tmp_path / "run")
  assert last < 0.5 * first
  for k in ("implausibility", "misalignment"):
    first, last = _first_last(tmp_path / "run", f"heatmap_mse/{k}")
    assert last < 0.5 * first
  assert report["examples"] == len(manifest["splits"]["test"]["records"])
  _main(tmp_path / "run", manual, "--config.job=eval_reward", "--config.eval.weights=init")
  base = _eval(tmp_path / "run", "init")
  for k in ("implausibility", "misalignment"):
    trained, untrained = report["heatmaps"][k], base["heatmaps"][k]
    # Measured (one device, XLA level 1): CC 0.76 / 0.88 against -0.01 / 0.01, AUC-Judd 0.85 /
    # 0.94 against 0.49 / 0.51 (implausibility / misalignment).
    assert trained["cc"] > untrained["cc"] + 0.3, (k, trained, untrained)
    assert trained["auc_judd"] > untrained["auc_judd"] + 0.15, (k, trained, untrained)
  # The export is the rahf_* rewards' file layout, with the step in its metadata.
  exported = os.path.join(tmp_path / "run", "export", "rahf.safetensors")
  heads = rahf_lib.read_heads(exported)
  assert heads.scores == rahf_lib.SCORE_TYPES and heads.heatmaps == rahf_lib.HEATMAP_TYPES
  assert any(k.startswith("heatmap_implausibility/") for k in load_file(exported))
  html = open(os.path.join(tmp_path / "run", "eval", "test.html")).read()
  assert html.count("<img") == 4 * (1 + 2 * 2) and "auc_judd" in html


def test_toy_defect_reward_trains_through_the_same_job(whole, tmp_path):
  # The uninterrupted run that the resume tests below compare against (toy_tiny, 30 steps):
  # a run of its own would train the same job again.
  report = _eval(whole)
  first, last = _first_last(whole)
  assert last < 0.5 * first
  params = toy_reward.load(os.path.join(whole, "export", "toy_defect.safetensors"))
  assert set(params) == set(toy_reward.init())  # the toy_defect reward reads the export
  base = _baseline(_config_30(), tmp_path)
  assert report["heatmaps"]["defect"]["auc_judd"] > base["heatmaps"]["defect"]["auc_judd"]
  assert report["heatmaps"]["defect"]["cc"] > base["heatmaps"]["defect"]["cc"]


class _StopAt:
  """A preemption handler that reports SIGTERM once `step` is reached."""

  def __init__(self, step):
    self.step = step

  def __call__(self, step=None):
    return step is not None and step >= self.step

  def uninstall(self):
    pass


def _config_30():
  """toy_tiny in 30 steps: enough to halve the loss and beat the untrained net; its panels
  (log.image_every = 30) at the last step. Checkpoints at 20 and 30 only, what the resume tests
  need (20 is where a broken 30 falls back to): a save costs about as much as ten steps."""
  c = load("rahf").get_config("toy_tiny")
  c.train.num_steps, c.checkpoint.every, c.checkpoint.keep = 30, 20, 3
  return c


def _export(workdir):
  return load_file(os.path.join(workdir, "export", "toy_defect.safetensors"))


def _assert_same_export(a, b):
  a, b = _export(a), _export(b)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope="module", name="whole")
def fixture_whole(tmp_path_factory):
  """An uninterrupted 30-step run (checkpoints at 20 and 30), evaluated at its end."""
  workdir = tmp_path_factory.mktemp("whole")
  _run(_config_30(), workdir)
  return workdir


def test_stopped_and_rerun_ends_where_an_uninterrupted_run_ends(whole, tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint, "install_preemption_handler", lambda: _StopAt(13))
  with pytest.raises(loop_lib.Preempted) as e:  # as the Focus-N-Fix trainer stops
    _run(_config_30(), tmp_path / "parts")
  assert e.value.code == 143 and e.value.step == 13
  assert not os.path.exists(tmp_path / "parts" / "export")
  assert "13" in os.listdir(tmp_path / "parts" / "checkpoints")
  monkeypatch.undo()
  _run(_config_30(), tmp_path / "parts")
  _assert_same_export(whole, tmp_path / "parts")
  # One metrics row per step: the rows the stopped run logged after its checkpoint are redone.
  assert read_metrics(tmp_path / "parts").keys() == read_metrics(whole).keys()


def test_a_broken_newest_checkpoint_is_moved_aside_and_the_one_before_resumes(
    whole, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(whole, workdir)
  shutil.rmtree(workdir / "export")
  os.remove(workdir / "checkpoints" / "30" / "state" / "_METADATA")
  caplog.set_level("INFO")
  _run(_config_30(), workdir)
  (line,) = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert line.startswith(f"checkpoint step 30 in {workdir}/checkpoints cannot be restored (")
  assert "resuming from checkpoint step 20" in caplog.text
  (aside,) = os.listdir(workdir / "checkpoints.broken")
  assert aside.startswith("30-")
  _assert_same_export(whole, workdir)  # steps 21..30 again: the same weights


@pytest.mark.parametrize("arg, change, message", [
    ("runlocal", {"data.manual_dir": "/nonexistent/richhf"}, "data.manual_dir"),
    ("toy_tiny", {"data.name": "bogus"}, "richhf18k"),
    ("toy_tiny", {"model.name": "rahf"}, "must have exactly the fields"),
    ("toy_tiny", {"eval.split": "dev"}, "'train', 'test'"),
    ("toy_tiny", {"loss.heatmap": "l1"}, "'mse', 'bce'"),
    ("toy_tiny", {"data.batch_size": 7}, "divisible"),
    (None, {"data.manual_dir": "."}, "model.vit_path"),
])
def test_bad_configs_fail_before_anything_loads(arg, change, message, tmp_path):
  from fnf_jax.config import validate  # pylint: disable=import-outside-toplevel
  config = load("rahf").get_config(arg)
  for key, value in change.items():
    node = config
    *path, last = key.split(".")
    for k in path:
      node = node[k]
    node[last] = value
  with pytest.raises(validate.ConfigError, match=message):
    _run(config, tmp_path)
  assert not os.path.exists(tmp_path / "tfds")  # nothing was built


def test_config_variants():
  module = load("rahf")
  assert module.get_config().job == "train_reward"
  assert "python -m fnf_jax.main --config=configs/rahf.py" in module.__doc__
  with pytest.raises(ValueError, match="runlocal"):
    module.get_config("bogus")
