"""Fault injection on the violence config's CPU variant: SIGKILL at ten moments drawn from a fixed
seed (several of them while a checkpoint is being saved), each time resumed by running the same
command again, ends with the LoRA and the metrics of an uninterrupted run.

Slow (4 min 40 s on 2 cores): `make test-slow`, or
    .venv/bin/pytest -q -m slow tests/test_faults.py
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 8, 2
FLAGS = [f"--config={ROOT}/configs/violence.py:runlocal", f"--config.train.num_steps={STEPS}",
         f"--config.checkpoint.every={EVERY}", "--config.log.image_every=0",
         "--config.log.tensorboard=False", "--config.log.every=1"]


def env() -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
           XLA_FLAGS="--xla_force_host_platform_device_count=1")
  e["PYTHONPATH"] = os.pathsep.join([ROOT, e.get("PYTHONPATH", "")])
  return e


def run(workdir, kill_after_step=None, delay=0.0) -> str:
  """Runs the job; with `kill_after_step`, SIGKILLs it `delay` s after it logs that step (a
  checkpoint step's log line comes just before its save starts). Returns how it ended."""
  proc = subprocess.Popen([sys.executable, "-m", "fnf_jax.main", f"--workdir={workdir}", *FLAGS],
                          cwd=ROOT, env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  marker = f"step {kill_after_step}/{STEPS} " if kill_after_step else None
  seen, lines = threading.Event(), []

  def read():
    for line in proc.stderr:
      lines.append(line)
      if marker and marker in line:
        seen.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  if marker:
    while not seen.is_set() and proc.poll() is None:
      time.sleep(0.005)
    if seen.is_set():
      time.sleep(delay)
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=300)
  reader.join(timeout=10)
  if proc.returncode == -signal.SIGKILL:
    return "killed"
  assert proc.returncode == 0, "".join(lines[-40:])
  return "finished"


def newest_checkpoint(workdir) -> int:
  folder = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=0)


def metrics(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"rows not unique per step: {steps}"
  return {r["step"]: r for r in rows}


@pytest.mark.slow
def test_ten_sigkills_resume_to_the_uninterrupted_result(tmp_path):
  clean, faulty = str(tmp_path / "clean"), str(tmp_path / "faulty")
  assert run(clean) == "finished"
  rng = np.random.default_rng(20261202)
  outcomes = []
  for i in range(10):
    # The next run resumes after the newest checkpoint: kill it at a step it will reach. Half
    # the kills just after a checkpoint step's log line (its save in flight), the others at
    # any step, each after a random delay of up to 0.3 s.
    done = newest_checkpoint(faulty)
    if done >= STEPS - 1:
      break  # nothing left to interrupt (the assertion below says how many kills landed)
    saves = list(range(done + EVERY, STEPS, EVERY))
    step = int(rng.choice(saves)) if i % 2 == 0 and saves else int(rng.integers(done + 1, STEPS))
    outcomes.append((step, run(faulty, step, float(rng.uniform(0.0, 0.3)))))
  assert sum(o == "killed" for _, o in outcomes) >= 8, outcomes
  assert sum(s % EVERY == 0 for s, o in outcomes if o == "killed") >= 3, outcomes
  while run(faulty) != "finished":
    pass
  want, got = metrics(clean), metrics(faulty)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in want:
    for key in ("loss", "reward", "constraint", "grad_norm"):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6, atol=1e-9,
                                 err_msg=f"step {step} {key}")
  a, b = load_file(os.path.join(faulty, "lora.safetensors")), load_file(
      os.path.join(clean, "lora.safetensors"))
  for k in b:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9, err_msg=k)
