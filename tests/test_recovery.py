"""Runs that recover by themselves and keep an honest record (the violence config's CPU variant):
the run record on resume, non-finite steps that are never applied, SIGTERM, one run per workdir,
tidy outputs."""

import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors import safe_open

from fnf_jax.runtime import checkpoint
from fnf_jax import main
from fnf_jax.runtime import resume as record
from fnf_jax.runtime import runlock
from fnf_jax.fnf import run as run_lib
from fnf_jax.runtime import loop as loop_lib
from fnf_jax.config import validate
from test_train import read_metrics, tiny_config


def test_a_resume_applies_a_new_rate_and_refuses_a_new_rank(tmp_path):
  workdir = str(tmp_path)
  main.run_job(tiny_config(**{"train.num_steps": 2}), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = f.read()
  # A change the checkpoint cannot follow: refused with both values, before anything is written.
  with pytest.raises(validate.ConfigError, match=r"lora\.rank: 4 -> 8.*Nothing was overwritten"):
    main.run_job(tiny_config(**{"train.num_steps": 4, "lora.rank": 8}), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == recorded
  # The rate: applied from the first resumed step, recorded in the history and config.json.
  main.run_job(tiny_config(**{"train.num_steps": 4, "optim.lr": 5e-4}), workdir)
  m = read_metrics(workdir)
  # Warm-up of 2 steps: the rate is lr · min(update / 2, 1).
  assert m[2]["lr"] == pytest.approx(1e-3 * 0.5) and m[3]["lr"] == pytest.approx(5e-4)
  with open(os.path.join(workdir, record.HISTORY)) as f:
    (line,) = [json.loads(x) for x in f]
  assert line["step"] == 2 and line["changes"]["optim.lr"] == [1e-3, 5e-4]
  assert line["changes"]["train.num_steps"] == [2, 4]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 5e-4


def test_a_non_finite_step_is_never_applied_and_the_first_is_named(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  # The config check refuses such a rate (validate.MAX_LR); lifted here to reach the step's guard.
  monkeypatch.setattr(validate, "MAX_LR", math.inf)
  # Metrics fetched at step 3 only. Step 1 runs at rate 0 (the warm-up's first step) and is
  # saved (orbax saves a run's first step); steps 2 and 3 overflow and are not applied, and the
  # error names step 2, the first, and the checkpoint that holds good weights.
  config = tiny_config(**{"optim.lr": 1e30, "log.every": 3, "checkpoint.every": 3})
  with pytest.raises(loop_lib.NonFiniteLossError,
                     match=r"non-finite update_norm at step 2 .*update_norm inf\); the step was "
                     r"not applied .*Last good checkpoint: step 1 in "):
    main.run_job(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]


def test_sigterm_saves_exits_143_and_leaves_no_final_lora(tmp_path, monkeypatch):
  workdir = str(tmp_path)

  class StopAtTwo:
    def __call__(self, step=None):
      return step == 2

    def uninstall(self):
      pass

  monkeypatch.setattr(checkpoint, "install_preemption_handler", StopAtTwo)
  with pytest.raises(SystemExit) as stopped:
    main.run_job(tiny_config(), workdir)
  assert stopped.value.code == 143
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2,
                                 every=2).latest_step() == 2
  assert not os.path.exists(os.path.join(workdir, "lora.safetensors"))
  monkeypatch.undo()
  main.run_job(tiny_config(), workdir)  # the restart finishes the run
  with safe_open(os.path.join(workdir, "lora.safetensors"), "np") as f:
    assert f.metadata()["step"] == "4"
  assert sorted(read_metrics(workdir)) == [1, 2, 3, 4]


def test_replayed_steps_keep_one_row_and_stale_saves_are_removed(trained, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)  # the finished run: checkpoints at 2 and 4
  ckpts = os.path.join(workdir, "checkpoints")
  # As if killed after logging step 4, before its save finished.
  os.rename(os.path.join(ckpts, "4"), os.path.join(ckpts, "4.orbax-checkpoint-tmp-1"))
  main.run_job(tiny_config(), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4]
  assert sorted(os.listdir(ckpts)) == ["2", "4"]


def test_a_finished_run_says_so_without_compiling(trained, tmp_path, caplog):
  import shutil  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)  # a finished run (it used to be one of its own)
  os.remove(os.path.join(workdir, "lora.safetensors"))
  caplog.set_level("INFO")
  main.run_job(tiny_config(), workdir)
  assert "is finished (step 4 of 4): nothing to train" in caplog.text
  assert "compiled the train step" not in caplog.text
  assert os.path.exists(os.path.join(workdir, "lora.safetensors"))  # written again


def test_a_second_run_meets_the_lock_and_a_dead_holder_does_not_block(tmp_path):
  workdir = str(tmp_path)
  with runlock.hold(workdir):
    with pytest.raises(runlock.WorkdirLockedError,
                       match=rf"in use by another run \({workdir}/run.lock: host .*pid {os.getpid()}"):
      main.run_job(tiny_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, runlock.NAME))  # released
  # A holder killed on this host (its pid is gone): taken over.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  path = os.path.join(workdir, runlock.NAME)
  with open(path, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": int(dead.stdout)}, f)
  with runlock.hold(workdir):
    assert json.load(open(path))["pid"] == os.getpid()
  # A holder on another host: blocks while its heartbeat is fresh, not once it is stale.
  with open(path, "w") as f:
    json.dump({"host": "elsewhere", "pid": 1}, f)
  with pytest.raises(runlock.WorkdirLockedError, match="host elsewhere"):
    with runlock.hold(workdir):
      pass
  old = time.time() - runlock.STALE_S - 5
  os.utime(path, (old, old))
  with runlock.hold(workdir):
    assert json.load(open(path))["host"] == socket.gethostname()


def test_the_lora_file_has_stable_bytes_and_honours_the_umask(tmp_path):
  rng = np.random.default_rng(0)
  layer = lambda: {"lora_a": rng.normal(size=(8, 2)).astype(np.float32),
                   "lora_b": rng.normal(size=(2, 8)).astype(np.float32)}
  tree = {"down_blocks_0": {"attn1": {"to_q": layer(), "to_k": layer()}}, "mid_block": layer()}
  reordered = {"mid_block": tree["mid_block"],
               "down_blocks_0": {"attn1": {"to_k": tree["down_blocks_0"]["attn1"]["to_k"],
                                           "to_q": tree["down_blocks_0"]["attn1"]["to_q"]}}}
  old = os.umask(0o022)
  try:
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    checkpoint.export_lora_safetensors(tree, a, alpha=2.0, rank=2, step=7)
    checkpoint.export_lora_safetensors(reordered, b, alpha=2.0, rank=2, step=7)
  finally:
    os.umask(old)
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()
  assert os.stat(a).st_mode & 0o777 == 0o644


def _largest(folder: str) -> str:
  files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
  return max(files, key=os.path.getsize)


CORRUPTIONS = {
    "truncated array file": lambda c: os.truncate(p := _largest(f"{c}/state"),
                                                  os.path.getsize(p) // 2),
    "missing _METADATA": lambda c: os.remove(f"{c}/state/_METADATA"),
    "missing meta/metadata": lambda c: os.remove(f"{c}/meta/metadata"),
    "empty manifest.ocdbt": lambda c: os.truncate(f"{c}/state/manifest.ocdbt", 0),
}


@pytest.fixture(scope="module", name="trained")
def fixture_trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  main.run_job(tiny_config(), workdir)  # checkpoints at 2 and 4
  return workdir, read_metrics(workdir)


# One corruption in `make test`; the other three with the slow fault-injection suite.
@pytest.mark.parametrize("how", [pytest.param(h, marks=() if h == "missing _METADATA" else
                                              pytest.mark.slow) for h in sorted(CORRUPTIONS)])
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_one_before_resumes(
    how, trained, tmp_path, caplog):
  import shutil  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  os.remove(os.path.join(workdir, "lora.safetensors"))
  CORRUPTIONS[how](os.path.join(workdir, "checkpoints", "4"))
  caplog.set_level("INFO")
  main.run_job(tiny_config(), workdir)
  (line,) = [r.getMessage() for r in caplog.records
             if "cannot be restored" in r.getMessage()]
  assert line.startswith(f"checkpoint step 4 in {workdir}/checkpoints cannot be restored (")
  assert f"moved to {workdir}/checkpoints.broken/4-" in line and "\n" not in line
  assert "resuming from checkpoint step 2" in caplog.text
  (aside,) = os.listdir(os.path.join(workdir, "checkpoints.broken"))
  assert aside.startswith("4-")
  resumed = read_metrics(workdir)
  for step in (3, 4):  # the same steps again, the same numbers
    assert resumed[step]["loss"] == pytest.approx(trained[1][step]["loss"], rel=1e-6)


def test_bad_files_are_named_with_the_tensor_line_or_byte(tmp_path):
  from fnf_jax.data import prompts  # pylint: disable=import-outside-toplevel
  from fnf_jax.models import convert  # pylint: disable=import-outside-toplevel

  garbage = str(tmp_path / "garbage.safetensors")
  with open(garbage, "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
  with pytest.raises(convert.CheckpointError, match=rf"{garbage}: not a readable safetensors"):
    convert.read_state_dict([garbage])
  nan = str(tmp_path / "nan.safetensors")
  convert.write_safetensors(nan, {"ok": np.ones(3, np.float32),
                                  "down.weight": np.array([1.0, np.nan], np.float32)})
  with pytest.raises(convert.CheckpointError, match=r"nan.safetensors: tensors \['down.weight'\]"):
    convert.read_state_dict([nan])
  text = tmp_path / "prompts.txt"
  text.write_bytes("a red circle\nun cœur\n".encode() + b"caf\xe9\n")
  cfg = tiny_config().prompts
  cfg.source, cfg.path = "text", str(text)
  with pytest.raises(ValueError, match=r"prompts.txt: line 3, byte 25 \(0xe9\) is not UTF-8"):
    prompts.load(cfg, "all")


@contextlib.contextmanager
def _tmpfs(path, options: str):
  """A tmpfs mounted at `path` for the block (skips the test where mounting needs root)."""
  path.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs ({options}) here ({mounted.stderr.strip()}): needs root")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


def _main(workdir: str, *overrides: str) -> subprocess.CompletedProcess:
  """`python -m fnf_jax.main` on the violence CPU variant, as a user runs it (one CPU device,
  not the 8 fake ones of this process)."""
  return subprocess.run(
      [sys.executable, "-m", "fnf_jax.main", "--config=configs/violence.py:runlocal",
       f"--workdir={workdir}", *overrides], cwd=os.path.dirname(os.path.dirname(__file__)),
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1"),
      capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # 85 s: with the fault-injection suite (`-m slow`)
def test_a_full_disk_stops_in_one_line_and_the_earlier_checkpoints_restore(tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel

  with _tmpfs(tmp_path / "disk", "size=2500k") as disk:
    workdir = str(disk / "run")
    # The compilation cache off: by default it sits beside the workdir, on this small disk.
    proc = _main(workdir, "--config.train.num_steps=20", "--config.checkpoint.keep=10",
                 "--config.log.image_every=0", "--config.compile.cache_dir=")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (fatal,) = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert re.search(rf"FATAL: {workdir}/checkpoints: [\d,]+ bytes free, a checkpoint needs "
                     r"about [\d,]+; not saving \(the earlier checkpoints are intact; newest: "
                     r"step (\d+)\)", fatal), fatal
    assert "Traceback" not in proc.stderr and "RESOURCE_EXHAUSTED" not in proc.stderr
    newest = int(re.search(r"newest: step (\d+)", fatal).group(1))
    copy = str(tmp_path / "roomy")
    shutil.copytree(workdir, copy)
  # On a disk with room, the newest checkpoint restores: the run is finished at that step.
  from configs import violence  # pylint: disable=import-outside-toplevel

  config = violence.get_config("runlocal")
  config.train.num_steps, config.checkpoint.keep, config.log.image_every = newest, 10, 0
  config.mesh.data = 1  # this process has 8 devices; the layout may change on resume
  main.run_job(config, copy)
  with safe_open(os.path.join(copy, "lora.safetensors"), "np") as f:
    assert f.metadata()["step"] == str(newest)


def test_an_unwritable_workdir_stops_in_one_line_before_anything_loads(tmp_path, monkeypatch):
  def no_setup(*_):
    raise AssertionError("setup ran: the workdir should have been refused first")

  monkeypatch.setattr(run_lib, "setup", no_setup)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  workdir = str(blocker / "run")  # under a regular file: ENOTDIR, whoever the user is
  with pytest.raises(runlock.UnwritableWorkdirError,
                     match=rf"^{workdir}: the workdir cannot be written \(Not a directory: "):
    main.run_job(tiny_config(), workdir)
  # The lock is met before the models load too.
  other = str(tmp_path / "other")
  with runlock.hold(other):
    with pytest.raises(runlock.WorkdirLockedError):
      main.run_job(tiny_config(), other)


@pytest.mark.slow  # 15 s: with the fault-injection suite (`-m slow`)
def test_a_read_only_workdir_exits_1_with_one_fatal_line(tmp_path):
  with _tmpfs(tmp_path / "ro", "ro,size=1m") as disk:
    workdir = str(disk / "run")
    proc = _main(workdir)
  assert proc.returncode == 1, proc.stderr[-3000:]
  (fatal,) = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert fatal.startswith(f"FATAL: {workdir}: the workdir cannot be written (Read-only file "
                          "system: "), fatal
  assert "Traceback" not in proc.stderr


def test_long_prompts_are_reported_alike_by_every_job(tmp_path, caplog):
  import tiny_pipelines  # pylint: disable=import-outside-toplevel
  from configs import sample as sample_config  # pylint: disable=import-outside-toplevel
  from fnf_jax.diffusion import pipeline  # pylint: disable=import-outside-toplevel

  folder = str(tmp_path / "model")
  tiny_pipelines.build("sd1", folder)
  texts = ("a red circle", "word " * 90, "a blue square")
  expected = ("config prompts.texts: 1 prompt(s) longer than the text encoder's 77 tokens, "
              "truncated (lines 2)")
  caplog.set_level("INFO")
  config = tiny_config()
  config.model.path = folder
  config.prompts.source, config.prompts.texts, config.prompts.eval_fraction = "list", texts, 0.0
  run_lib.training_examples(config, pipeline.load(folder))
  assert expected in caplog.text
  caplog.clear()
  job = sample_config.get_config()
  job.model.path, job.prompts.texts, job.seeds, job.sampling.num_steps = folder, texts, (0,), 1
  main.run_job(job, str(tmp_path / "work"))
  assert expected in caplog.text
