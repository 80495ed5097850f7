"""Gaps a fault / bad-input probe found (issue 25, item 6): the run's settings kept with every
checkpoint (a lost or edited config.json no longer switches the resume check off), nothing left
in $TMPDIR, a disk check that counts what a save writes, and orbax's stray metadata warning.

One tiny training run (the violence config's CPU variant, 2 steps) serves them all."""

import json
import logging
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
import orbax.checkpoint as ocp
from etils import epath

from fnf_jax import main
from fnf_jax.config import validate
from fnf_jax.diffusion import random_models
from fnf_jax.models import lora_io
from fnf_jax.runtime import checkpoint
from fnf_jax.runtime import diskspace
from fnf_jax.runtime import resume as record
from test_recovery import _tmpfs
from test_train import tiny_config

STEPS = {"train.num_steps": 2}  # checkpoints at steps 1 (a run's first) and 2


@pytest.fixture(scope="module", name="trained")
def fixture_trained(tmp_path_factory):
  """(workdir, what the run left in its empty $TMPDIR)."""
  tmp = str(tmp_path_factory.mktemp("tmpdir"))
  workdir = str(tmp_path_factory.mktemp("trained"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TMPDIR", tmp)
    patch.setattr(tempfile, "tempdir", None)  # re-read from $TMPDIR by gettempdir()
    assert tempfile.gettempdir() == tmp
    main.run_job(tiny_config(**STEPS), workdir)
  return workdir, sorted(os.listdir(tmp))


def _copy(trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  return workdir


def _files(folder: str) -> dict:
  """{relative path: (size, mtime)} of every file under `folder`."""
  out = {}
  for d, _, names in os.walk(folder):
    for n in names:
      st = os.stat(os.path.join(d, n))
      out[os.path.relpath(os.path.join(d, n), folder)] = (st.st_size, st.st_mtime_ns)
  return out


# --- nothing outside the workdir ---------------------------------------------------------------

def test_a_runlocal_run_leaves_nothing_in_tmpdir(trained):
  # The tiny tokenizer was written to a mkdtemp() folder and left there, one per run.
  assert trained[1] == []


# --- the settings kept with every checkpoint ---------------------------------------------------

def test_every_checkpoint_holds_the_runs_settings(trained):
  folder = os.path.join(trained[0], "checkpoints")
  steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit())
  assert steps == [1, 2]
  want = record.as_json(tiny_config(**STEPS))
  for step in steps:
    assert checkpoint.read_settings(folder, step) == want
  with open(os.path.join(trained[0], record.CONFIG)) as f:
    assert json.load(f) == want


def test_a_lost_config_json_does_not_switch_the_check_off(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  os.remove(os.path.join(workdir, record.CONFIG))
  before = _files(workdir)
  changed = tiny_config(**STEPS, **{"seed": 7, "objective.beta": 0.5, "lora.alpha": 99.0})
  with pytest.raises(validate.ConfigError) as refused:
    main.run_job(changed, workdir)
  message = str(refused.value)
  for key, old, new in (("lora.alpha", 4.0, 99.0), ("objective.beta", 0.01, 0.5),
                        ("seed", 0, 7)):
    assert f"{key}: {old!r} -> {new!r}" in message, message
  assert "checkpoint step 2" in message and "Nothing was overwritten" in message
  assert _files(workdir) == before  # no config.json written with settings never trained
  # A change a resume may make is still accepted, against the checkpoint's settings; the run
  # record is written again (the run is finished at step 2: nothing compiles).
  caplog.set_level("INFO")
  main.run_job(tiny_config(**STEPS, **{"optim.lr": 5e-4}), workdir)
  assert f"{workdir}/config.json is missing: the resume is checked against the settings " \
         "saved with checkpoint step 2" in caplog.text
  with open(os.path.join(workdir, record.CONFIG)) as f:
    assert json.load(f)["optim"]["lr"] == 5e-4
  with open(os.path.join(workdir, record.HISTORY)) as f:
    (line,) = [json.loads(x) for x in f]
  assert line["step"] == 2 and line["changes"] == {"optim.lr": [1e-3, 5e-4]}


def test_an_edited_config_json_does_not_open_the_door(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, record.CONFIG)
  with open(path) as f:
    edited = json.load(f)
  edited["lora"]["alpha"] = 99.0  # as if to make a resume at alpha 99 pass
  with open(path, "w") as f:
    json.dump(edited, f)
  with pytest.raises(validate.ConfigError, match=r"\(the settings saved with checkpoint step "
                     r"2\).*: lora\.alpha: 4\.0 -> 99\.0\. Nothing was overwritten"):
    main.run_job(tiny_config(**STEPS, **{"lora.alpha": 99.0}), workdir)
  assert "disagrees with the settings saved with checkpoint step 2 (lora.alpha)" in caplog.text
  # A reader of the workdir takes the alpha the weights were trained with, not the edit.
  unet = random_models.random_pipeline(0, weights=False).abstract_params()["unet"]
  _, scale = lora_io.load(workdir, unet)
  config = tiny_config()
  assert scale == config.lora.alpha / config.lora.rank != 99.0 / config.lora.rank


def test_checkpoints_without_settings_or_record_are_refused(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in ("1", "2"):  # as saved before settings were kept
    shutil.rmtree(os.path.join(workdir, "checkpoints", step, checkpoint.SETTINGS))
  with open(os.path.join(workdir, record.CONFIG)) as f:
    recorded = json.load(f)
  recorded["lora"]["alpha"] = 99.0
  with open(os.path.join(workdir, record.CONFIG), "w") as f:
    json.dump(recorded, f)
  # Such checkpoints are checked against config.json, as before...
  with pytest.raises(validate.ConfigError, match=r"lora\.alpha: 99\.0 -> 4\.0"):
    record.check_resume(tiny_config(**STEPS), workdir)
  assert record.check_resume(tiny_config(**STEPS, **{"lora.alpha": 99.0}), workdir) == {}
  # ... and without it, their settings are unknown: refused, naming the file and the steps.
  os.remove(os.path.join(workdir, record.CONFIG))
  with pytest.raises(validate.ConfigError, match=rf"{workdir}/config.json is missing, and "
                     r"checkpoint step\(s\) \[1, 2\] .* were saved without their settings"):
    record.check_resume(tiny_config(**STEPS), workdir)


# --- orbax's metadata warning ------------------------------------------------------------------

def test_reading_a_runs_lora_logs_no_metadata_warning(trained, caplog):
  caplog.set_level(logging.INFO)
  absl_logging.warning("a warning through absl")  # the capture sees absl's warnings
  step, tree = checkpoint.read_newest(os.path.join(trained[0], "checkpoints"), ("train", "lora"))
  assert step == 2 and tree
  assert "a warning through absl" in caplog.text
  assert "Metadata file does not exist" not in caplog.text, caplog.text
  assert "_CHECKPOINT_METADATA" not in caplog.text


# --- the disk check ----------------------------------------------------------------------------

def _allocated(folder: str) -> int:
  return sum(diskspace._allocated(os.path.join(d, n))  # pylint: disable=protected-access
             for d, _, names in os.walk(folder) for n in names)


def _state(kind: str, seed: int = 0) -> dict:
  """Small arrays (stored inside the B-tree, copied by orbax's merge) and large ones; zeros
  (a new run's LoRA B and Adam moments: they compress to nothing) or incompressible floats."""
  rng = np.random.default_rng(seed)
  make = (lambda n: np.zeros(n, np.float32)) if kind == "zeros" else (
      lambda n: rng.standard_normal(n).astype(np.float32))
  return {"train": {"lora": {f"down_blocks_{i}_attentions_0_to_q": {"lora_a": make(128),
                                                                    "lora_b": make(200)}
                             for i in range(60)},
                    "big": make(200_000)}, "rng": jax.random.key(0)}


def test_the_estimate_bounds_what_saves_write(tmp_path, trained):
  with checkpoint.Checkpointer(tmp_path, keep=3, every=1) as ckpt:
    ckpt.save(1, _state("zeros"), {"step": 1})
    ckpt.save(2, _state("random"), {"step": 2})
    ckpt.wait()
  first, second = _allocated(str(tmp_path / "1")), _allocated(str(tmp_path / "2"))
  # The checkpoints grew as the old 1.1 x newest rule could not see...
  assert second > 2 * first
  # ... and the estimate bounds both, measured on the one before or from the tree alone.
  for newest in (None, str(tmp_path / "1")):
    need = diskspace.needed(_state("random"), newest)
    assert first <= need and second <= need
    assert need - diskspace.SLACK <= 2 * second  # a bound, not a blanket
  # The same on the training run's own checkpoints (its state read back as shapes).
  folder = os.path.join(trained[0], "checkpoints")
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(folder) / "2" / "state").tree
  tree = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
  for step in (1, 2):
    assert _allocated(os.path.join(folder, str(step))) <= diskspace.needed(
        tree, os.path.join(folder, "1")) <= diskspace.needed(tree) + 2**20


def test_a_save_that_cannot_fit_is_refused_before_a_byte_is_written(tmp_path):
  roomy = str(tmp_path / "roomy")
  with checkpoint.Checkpointer(roomy, keep=3, every=1) as ckpt:
    ckpt.save(1, _state("zeros"), {"step": 1})  # a new run's weights: compressed to little
  first = _allocated(os.path.join(roomy, "1"))
  need = diskspace.needed(_state("random"), os.path.join(roomy, "1"))
  # A disk that holds the first checkpoint and less than the next one needs (the probe's
  # resume on a small disk).
  with _tmpfs(tmp_path / "disk", f"size={(first + need) // 1024 - 32}k") as disk:
    folder = str(disk / "checkpoints")
    shutil.copytree(roomy, folder)
    before = _files(folder)
    free = shutil.disk_usage(folder).free
    # The old rule (1.1 x the newest checkpoint) let this save start, to die half-way.
    assert 1.1 * first < free < need
    with checkpoint.Checkpointer(folder, keep=3, every=1) as ckpt:
      with pytest.raises(checkpoint.DiskFullError) as full:
        ckpt.save(2, _state("random"), {"step": 2})
      assert _files(folder) == before  # not a byte, not even orbax's temporary folder
      message = str(full.value)
      assert "\n" not in message and message.startswith(
          f"{folder}: {free:,} bytes free, a checkpoint needs about {need:,}; not saving (the "
          "earlier checkpoints are intact; newest: step 1)")
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                           sharding=device), _state("zeros"))
      restored, meta = ckpt.restore(1, target)
      assert meta == {"step": 1} and not restored["train"]["big"].any()


def test_a_resume_on_a_disk_too_small_stops_before_compiling(trained, tmp_path, caplog):
  folder = os.path.join(trained[0], "checkpoints")
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(folder) / "2" / "state").tree
  need = diskspace.needed(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta),
                          os.path.join(folder, "2"))
  used = _allocated(trained[0])
  with _tmpfs(tmp_path / "disk", f"size={(used + need // 2) // 1024 + 4}k") as disk:
    workdir = str(disk / "run")
    shutil.copytree(trained[0], workdir)
    assert 0 < shutil.disk_usage(workdir).free < need  # the copy fits, the next save does not
    before = _files(workdir)
    caplog.set_level("INFO")
    with pytest.raises(checkpoint.DiskFullError) as full:
      main.run_job(tiny_config(**{"train.num_steps": 4}), workdir)
    message = str(full.value)
    assert message.startswith(f"{workdir}/checkpoints: ") and "bytes free, a checkpoint needs" \
        " about" in message and "; not starting the run (" in message and "step 2)" in message
    assert "compiled the train step" not in caplog.text
    assert _files(workdir) == before  # config.json, the history, the logs: as they were
