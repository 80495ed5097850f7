"""Two processes with four fake CPU devices each, coordinated on 127.0.0.1: the cache job and
training, resumed in one process on eight devices and on one; the same run as one process.

Each process runs `python -m fnf_jax.main` under tests/process_audit.py, which records the
files it writes, so that the test can check that no file has two writers.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT = os.path.join(ROOT, "tests", "process_audit.py")
CONFIG = [f"--config={ROOT}/configs/violence.py:runlocal",
          "--config.data.batch_size=8", "--config.sampling.num_steps=2",
          "--config.train.reference=cache", "--config.checkpoint.every=2",
          "--config.log.image_every=0", "--config.log.tensorboard=False",
          "--config.data.prefetch=0"]
TOTAL = 6  # steps of the whole run: 4 on two processes, then 1 on 8 devices, 1 on 1 device


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  # The settings of conftest.py (full-precision matmuls, its persistent compilation cache, which
  # the resumed runs hit), with this process's device count.
  e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
           JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(
               jax.config.jax_persistent_cache_min_compile_time_secs),
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           # Shared with both pytest-xdist workers: the locked LRU cache, as conftest.py sets.
           JAX_COMPILATION_CACHE_MAX_SIZE=str(jax.config.jax_compilation_cache_max_size))
  e["PYTHONPATH"] = os.pathsep.join([ROOT, e.get("PYTHONPATH", "")])
  return e


def launch(workdir, record, devices, *flags):
  args = [sys.executable, AUDIT, record, "--", *CONFIG, f"--workdir={workdir}", *flags]
  return subprocess.Popen(args, env=env(devices), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(procs, what):
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, f"{what} failed (exit {p.returncode}):\n{out[-4000:]}"
  return outputs


def two_processes(workdir, records, *flags):
  port = free_port()
  dist = ["--config.distributed.enabled=True",
          f"--config.distributed.coordinator=127.0.0.1:{port}",
          "--config.distributed.num_processes=2"]
  procs = [launch(workdir, records[i], 4, *dist, f"--config.distributed.process_id={i}",
                  *flags) for i in range(2)]
  return finish(procs, "two-process run " + " ".join(flags))


def written(record, workdir) -> set:
  with open(record) as f:
    paths = json.load(f)
  root = os.path.realpath(workdir)
  return {os.path.relpath(os.path.realpath(p), root) for p in paths
          if os.path.realpath(p).startswith(root + os.sep)}


def metrics(workdir) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r for r in rows}


def test_two_processes_resume_anywhere_and_match_one_process(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  rec = lambda name: str(tmp_path / f"{name}.json")
  # The uninterrupted reference: one process, eight devices (it computes its cache first).
  baseline = launch(single, rec("single"), 8, f"--config.train.num_steps={TOTAL}")
  # Two processes: the cache job, then four training steps (checkpoints at 2 and 4).
  two_processes(multi, [rec("cache0"), rec("cache1")], "--config.job=cache")
  two_processes(multi, [rec("train0"), rec("train1")], "--config.train.num_steps=4")
  finish([baseline], "one-process run")
  # Resumed in one process on eight devices (step 5), then on one device (step 6).
  finish([launch(multi, rec("resume8"), 8, "--config.train.num_steps=5")], "resume on 8")
  finish([launch(multi, rec("resume1"), 1, f"--config.train.num_steps={TOTAL}")],
         "resume on 1")

  # Two processes reduce the gradients across processes (gloo) in another order than one
  # process does across its devices: float32 sums that differ in the last bits (step 1's loss
  # by 1e-7 relative). The logged losses stay within rtol 1e-5 of the one-process run; the
  # constraint and the gradient norm, small differences of images, within 1e-3. Adam divides
  # each gradient by its running magnitude, which turns those last bits into LoRA weights that
  # differ by up to 2.4e-6 (measured) where an Adam step moves them by lr = 1e-3: the LoRA is
  # compared with rtol 1e-5 plus atol 1e-5, 1 % of one step.
  want, got = metrics(single), metrics(multi)
  assert set(got) == set(want) == set(range(1, TOTAL + 1))
  for step in want:
    np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-5,
                               err_msg=f"step {step} loss")
    for key in ("reward", "constraint", "grad_norm", "change_outside"):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-3, atol=1e-7,
                                 err_msg=f"step {step} {key}")
  a, b = (load_file(os.path.join(w, "lora.safetensors")) for w in (multi, single))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)

  # The cache was split between the processes: each wrote its own part of every shard.
  parts = sorted(n for n in os.listdir(os.path.join(multi, "reference")) if n.endswith(".npy"))
  assert any(".p000." in n for n in parts) and any(".p001." in n for n in parts)
  # One writer per file: no path under the workdir was written by both processes.
  for job in ("cache", "train"):
    w0, w1 = written(rec(f"{job}0"), multi), written(rec(f"{job}1"), multi)
    assert w0 and w1, job
    assert not w0 & w1, f"{job}: written by both processes: {sorted(w0 & w1)}"
  for name in ("lora.safetensors", "metrics.jsonl", "config.json", "reference/manifest.json"):
    assert name in written(rec("train0"), multi) | written(rec("cache0"), multi), name
