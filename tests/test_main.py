"""The command line: config typos are reported with the valid keys, before anything runs."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fnf_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_config_typo_lists_valid_keys(tmp_path):
  out = _run("--config=configs/violence.py:runlocal", f"--workdir={tmp_path}",
             "--config.train.num_stepz=3")
  assert out.returncode == 2
  assert "unknown config key 'train.num_stepz'" in out.stderr
  assert "Valid keys of train: grad_steps, gradient, lv_copies, num_steps" in out.stderr
  assert not os.listdir(tmp_path)  # nothing was run or written


def test_unknown_config_argument_names_valid_ones(tmp_path):
  out = _run("--config=configs/violence.py:fast", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "valid: 'runlocal'" in out.stderr
