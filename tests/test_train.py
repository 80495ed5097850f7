"""The real training loop on tiny random models: sharding, resume, cache, failure modes."""

import contextlib
import json
import logging
import math
import os
import re

import numpy as np
import pytest

from configs import violence
from fnf_jax import main
from fnf_jax.config import validate
from fnf_jax.fnf import run as run_lib
from fnf_jax.runtime import loop as loop_lib


def tiny_config(**overrides):
  c = violence.get_config("runlocal")
  c.data.batch_size = 8  # divisible by the 2 x 4 mesh
  c.sampling.num_steps = 2
  c.train.num_steps = 4
  c.checkpoint.every = 2
  c.log.image_every = 0
  c.log.tensorboard = False
  c.mesh = {"data": 1, "fsdp": 1}
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


KEYS = ("loss", "reward", "constraint", "change_outside", "grad_norm")


def assert_same(a, b, steps, rtol, atol=1e-7):
  for s in steps:
    for k in KEYS:
      np.testing.assert_allclose(a[s][k], b[s][k], rtol=rtol, atol=atol, err_msg=f"step {s} {k}")


@contextlib.contextmanager
def log_lines():
  """The log's INFO lines while the block runs (caplog, for a module-scoped fixture)."""
  lines = []
  handler = logging.Handler(logging.INFO)
  handler.emit = lambda record: lines.append(record.getMessage())
  root = logging.getLogger()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    yield lines
  finally:
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  """The tiny run, four steps: its workdir's metrics and its log."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  with log_lines() as lines:
    main.run_job(tiny_config(), workdir)
  return read_metrics(workdir), lines


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
  return uninterrupted_run[0]


def test_the_log_says_how_long_compiling_took(uninterrupted_run):
  # The uninterrupted run's log (it used to be a run of its own, one step long: compiling
  # does not depend on the number of steps).
  said = [line for line in uninterrupted_run[1] if line.startswith("compiled ")]
  # The online reference's program and the step's four; the test session's cache is on, and
  # shared by the pytest-xdist workers: the other may have written some of these programs.
  assert len(said) == 1 and re.match(r"compiled the train step \(5 programs\) in [0-9.]+ s "
                                     r"\(cache (hit|miss|\d of 5 hit)", said[0]), said


def test_first_step_reproduces_reference(uninterrupted):
  # Zero-initialised LoRA up-projections: Î == Î0 exactly, so nothing changes and the
  # constraint is exactly 0 at step 1; training then moves the image.
  assert uninterrupted[1]["constraint"] == 0.0
  assert uninterrupted[1]["change_inside"] == 0.0 and uninterrupted[1]["change_outside"] == 0.0
  assert uninterrupted[4]["change_inside"] > 0.0
  assert set(uninterrupted) == {1, 2, 3, 4}


def test_resume_matches_uninterrupted(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  main.run_job(tiny_config(**{"train.num_steps": 2}), workdir)  # "killed" after step 2
  main.run_job(tiny_config(), workdir)  # the same command again resumes
  resumed = read_metrics(workdir)
  assert_same(uninterrupted, resumed, (1, 2, 3, 4), rtol=1e-6)
  assert os.path.isfile(os.path.join(workdir, "lora.safetensors"))


def test_overlapped_loop_logs_lazily_and_resumes_exactly(uninterrupted, tmp_path):
  """Metrics fetched only at logging / checkpoint steps and host batches prefetched: the logged
  steps carry the same numbers as the every-step run, before and after a resume."""
  workdir = str(tmp_path)
  overrides = {"log.every": 3, "checkpoint.every": 3, "data.prefetch": 2}
  main.run_job(tiny_config(**{**overrides, "train.num_steps": 2}), workdir)
  main.run_job(tiny_config(**overrides), workdir)
  resumed = read_metrics(workdir)
  assert set(resumed) == {2, 3, 4}  # step 2 ended the first run; 3 logs; 4 is the last
  assert_same(uninterrupted, resumed, (2, 3, 4), rtol=1e-6)


def test_eight_devices_match_one_and_restore_on_one(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  # Two steps on a 2 x 4 mesh of fake CPU devices (batch and large params sharded) ...
  main.run_job(tiny_config(**{"train.num_steps": 2, "mesh": {"data": 2, "fsdp": 4}}), workdir)
  sharded = read_metrics(workdir)
  assert_same(uninterrupted, sharded, (1, 2), rtol=2e-4, atol=1e-5)
  # ... and the 8-device checkpoint resumes on a 1-device mesh.
  main.run_job(tiny_config(), workdir)
  assert_same(uninterrupted, read_metrics(workdir), (3, 4), rtol=2e-4, atol=1e-5)


CACHED = {"train.reference": "cache", "train.num_steps": 2}


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
  """The cache job, then two training steps from its cache, in one workdir (the tests below
  copy it before they change anything). train.reference does not change what the cache job
  writes (reference_cache.fingerprint leaves it out): the job runs with the training's config."""
  workdir = str(tmp_path_factory.mktemp("cached"))
  main.run_job(tiny_config(**{**CACHED, "job": "cache"}), workdir)
  assert os.path.isfile(os.path.join(workdir, "reference", "manifest.json"))
  main.run_job(tiny_config(**CACHED), workdir)
  return workdir


def test_cached_reference_matches_online(uninterrupted, cached_run, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  shutil.copytree(cached_run, workdir)
  # Î0 and M stored in float32 by a separately compiled program: the same numbers as computing
  # them online up to XLA's fusion-dependent rounding (the online path is exact: see above).
  cached = read_metrics(workdir)
  assert cached[1]["constraint"] < 1e-4
  assert_same(uninterrupted, cached, (1, 2), rtol=1e-3, atol=1e-4)
  # Another config's cache job in the same workdir refuses to mix its shards with these.
  shards = sorted(os.listdir(os.path.join(workdir, "reference")))
  with pytest.raises(ValueError, match="nothing was overwritten"):
    main.run_job(tiny_config(**{"job": "cache", "sampling.num_steps": 3}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "reference"))) == shards


def test_training_on_a_fresh_workdir_computes_the_cache_first(cached_run, tmp_path):
  """train.reference = cache with no cache: the training command computes it, then trains, with
  the same files and results as the cache job run ahead (cached_run)."""
  ahead, fresh = cached_run, str(tmp_path / "fresh")
  main.run_job(tiny_config(**CACHED), fresh)
  assert_same(read_metrics(ahead), read_metrics(fresh), (1, 2), rtol=0, atol=0)
  folder = lambda w: os.path.join(w, "reference")
  assert sorted(os.listdir(folder(ahead))) == sorted(os.listdir(folder(fresh)))
  for name in os.listdir(folder(ahead)):
    if name.endswith(".npy"):
      np.testing.assert_array_equal(np.load(os.path.join(folder(ahead), name)),
                                    np.load(os.path.join(folder(fresh), name)), err_msg=name)


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path, monkeypatch):
  # Only the (injected) learning rate differs from the other runs: the same compiled step. The
  # config check refuses such a rate (validate.MAX_LR); lifted here to reach the step's guard.
  monkeypatch.setattr(validate, "MAX_LR", math.inf)
  config = tiny_config(**{"optim.lr": 1e30, "checkpoint.every": 1})
  with pytest.raises(loop_lib.NonFiniteLossError, match=r"at step (\d+).*Last good checkpoint: step"):
    main.run_job(config, str(tmp_path))


def test_real_config_without_model_path_says_how_to_get_one(tmp_path):
  config = violence.get_config()
  with pytest.raises(ValueError, match="--config.model.path="):
    main.run_job(config, str(tmp_path))


def test_select_examples_by_cached_mask_area():
  from fnf_jax.data import examples as examples_lib  # pylint: disable=import-outside-toplevel

  class AreaCache:  # example i's mask covers i / 10 of the image
    def area(self, index):
      return index / 10

  examples = examples_lib.make_examples([f"p{i}" for i in range(10)], 1, 0)
  c = tiny_config(**{"data.batch_size": 2})
  assert run_lib.select_examples(c, examples, None) == examples  # 0: everything, no cache needed
  c.data.min_mask_area = 0.65
  assert [e.index for e in run_lib.select_examples(c, examples, AreaCache())] == [7, 8, 9]
  c.data.min_mask_area = 0.95
  with pytest.raises(ValueError, match="fewer than one batch"):
    run_lib.select_examples(c, examples, AreaCache())


def test_random_streams_are_independent():
  from fnf_jax.data import examples as examples_lib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  prompts = [f"p{i}" for i in range(16)]
  a, b = (examples_lib.make_examples(prompts, 4, seed) for seed in (0, 1))
  assert not {e.seed for e in a} & {e.seed for e in b}
  x_a = {examples_lib.initial_noise(e.seed, (2, 2, 4)).tobytes() for e in a}
  x_b = {examples_lib.initial_noise(e.seed, (2, 2, 4)).tobytes() for e in b}
  assert len(x_a) == len(x_b) == 64 and not x_a & x_b  # seeds 0 and 1 share no x_T
  init_key, root = run_lib.step_keys(0)
  init = jax.random.key_data(init_key).tobytes()
  steps = {jax.random.key_data(jax.random.fold_in(root, s)).tobytes() for s in range(2000)}
  assert len(steps) == 2000 and init not in steps
