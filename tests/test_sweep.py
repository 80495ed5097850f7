"""A sweep (fnf_jax/fnf/sweep.py): several objective settings trained in one compiled step, each
member equal to a separate run of its setting."""

import logging
import os

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from fnf_jax import main
from fnf_jax.config import sweep as config_sweep
from fnf_jax.config import validate
from fnf_jax.fnf import sweep
from tests.test_train import read_metrics, tiny_config

BETAS = (0.0, 5.0)


def _lora(path: str) -> dict:
  return safetensors.numpy.load_file(path)


def _relative(a: dict, b: dict) -> float:
  assert a.keys() == b.keys()
  diff = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a)
  norm = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
  return (diff / norm) ** 0.5


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A sweep of two β on the violence CPU variant, on a mesh that gives each member 4 of the 8
  devices: (workdir, compile log lines)."""
  workdir = str(tmp_path_factory.mktemp("sweep"))
  c = _sweep_config()
  return workdir, _run_logging_compiles(c, workdir)


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def _run_logging_compiles(config, workdir: str) -> list[str]:
  """Runs the job; returns its "compiled the train step ..." log lines (a module-scoped
  fixture cannot use caplog)."""
  handler, root = _Lines(), logging.getLogger()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    main.run_job(config, workdir)
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
  return [m for m in handler.lines if m.startswith("compiled the train step")]


def test_sweep_members_equal_separate_runs(swept, tmp_path):
  workdir, compiled = swept
  # One compile of the step for both members (the same programs a single run compiles).
  assert len(compiled) == 1 and "(4 programs)" in compiled[0], compiled
  logged = read_metrics(workdir)
  loras, separate_compiles = {}, []
  for beta in BETAS:
    name = config_sweep.label({"beta": beta})
    alone = str(tmp_path / name)
    separate_compiles += _run_logging_compiles(
        tiny_config(**{"objective.beta": beta, "train.reference": "cache"}), alone)
    member = _lora(sweep.export_path(workdir, name))
    loras[beta] = member
    single = _lora(os.path.join(alone, "lora.safetensors"))
    assert _relative(member, single) <= 1e-4, (beta, _relative(member, single))
    separate = read_metrics(alone)
    assert set(separate) == {s for s in logged}
    for s in separate:
      for key in ("loss", "reward", "constraint", "grad_norm"):
        np.testing.assert_allclose(logged[s][f"{key}/{name}"], separate[s][key], rtol=1e-4,
                                   atol=1e-7, err_msg=f"step {s} {key} {name}")
    # The same file as a single run's export: keys, shapes, dtypes and metadata (rank, alpha,
    # step), so whatever loads a run's lora.safetensors (diffusers, peft, lora_io) loads it.
    with safetensors.safe_open(sweep.export_path(workdir, name), "np") as f, \
        safetensors.safe_open(os.path.join(alone, "lora.safetensors"), "np") as g:
      assert f.metadata() == g.metadata()
    assert {k: (v.shape, v.dtype) for k, v in member.items()} == {
        k: (v.shape, v.dtype) for k, v in single.items()}
  # β is an input of the step's programs: the second separate run, with another β, compiled
  # nothing new (the test session's persistent cache served every program).
  assert len(separate_compiles) == 2 and "(cache hit;" in separate_compiles[1], separate_compiles
  # The members did train apart: β changed the LoRA far beyond the tolerance.
  assert _relative(loras[BETAS[0]], loras[BETAS[1]]) > 1e-2
  assert not os.path.exists(os.path.join(workdir, "lora.safetensors"))


def _sweep_config(**overrides):
  c = tiny_config(**{"sweep.beta": BETAS, "train.reference": "cache", **overrides})
  c.mesh = {"sweep": 2, "data": 4, "fsdp": 1}
  return c


def test_a_sweep_resumes_where_it_stopped_and_refuses_other_settings(swept, tmp_path):
  workdir = str(tmp_path)
  main.run_job(_sweep_config(**{"train.num_steps": 2}), workdir)  # "killed" after step 2
  with pytest.raises(validate.ConfigError, match="sweep.beta"):
    main.run_job(_sweep_config(**{"sweep.beta": (0.0, 1.0)}), workdir)
  main.run_job(_sweep_config(), workdir)  # the same command again resumes
  for name in config_sweep.labels(_sweep_config()):
    resumed = _lora(sweep.export_path(workdir, name))
    assert _relative(resumed, _lora(sweep.export_path(swept[0], name))) <= 1e-6, name
  logged, want = read_metrics(workdir), read_metrics(swept[0])
  assert set(logged) == set(want) == {1, 2, 3, 4}
  for key in ("loss/beta=5", "grad_norm/beta=0"):
    np.testing.assert_allclose([logged[s][key] for s in want], [want[s][key] for s in want],
                               rtol=1e-6)


def test_sweep_settings_product_zip_and_labels():
  c = tiny_config(**{"sweep.beta": (0.1, 0.5), "sweep.gamma": (0.0, 1.0)})
  assert config_sweep.settings(c) == [{"beta": 0.1, "gamma": 0.0}, {"beta": 0.1, "gamma": 1.0},
                                      {"beta": 0.5, "gamma": 0.0}, {"beta": 0.5, "gamma": 1.0}]
  assert config_sweep.labels(c)[1] == "beta=0.1_gamma=1"
  c.sweep.combine = "zip"
  assert config_sweep.labels(c) == ("beta=0.1_gamma=0", "beta=0.5_gamma=1")
  obj = sweep.objective(c)
  np.testing.assert_array_equal(obj.beta, np.float32([0.1, 0.5]))
  np.testing.assert_array_equal(obj.reward_weight, np.float32([c.objective.reward_weight] * 2))
  assert obj.computes_latent  # one member has γ > 0: the term is computed for both
  member = config_sweep.member_config(c, config_sweep.settings(c)[1])
  assert member.objective.beta == 0.5 and member.objective.gamma == 1.0
  assert config_sweep.settings(member) == []
  assert config_sweep.settings(tiny_config()) == []


@pytest.mark.parametrize("changes, message", [
    ({"sweep.beta": (0.1, -1.0)}, r"config.sweep.beta\[1\] = -1.0 is not valid"),
    ({"sweep.reward_weight": (0.0,)}, r"config.sweep.reward_weight\[0\] = 0.0 is not valid"),
    ({"sweep.beta": (0.1, 0.1)}, "names a value twice"),
    ({"sweep.combine": "grid"}, "is not one of"),
    ({"sweep.beta": (0.1, 0.2), "sweep.gamma": (0.0,), "sweep.combine": "zip"},
     "different lengths"),
    ({"sweep.beta": (0.1, 0.2, 0.3), "mesh": {"sweep": 2, "data": 4, "fsdp": 1}},
     r"must be a fixed size that divides the sweep's 3 members"),
    ({"mesh": {"sweep": 2, "data": 4, "fsdp": 1}}, "config.sweep names no values"),
])
def test_bad_sweeps_are_refused_before_anything_loads(changes, message):
  c = tiny_config()
  for key, value in changes.items():
    if key == "mesh":
      c.mesh = value
    else:
      section, field = key.split(".")
      c[section][field] = value
  with pytest.raises(validate.ConfigError, match=message):
    validate.validate(c)


def test_the_batch_is_split_over_the_other_axes():
  # 8 examples over {"sweep": 2, "data": 4}: each member's 4 devices hold 2 examples each.
  c = tiny_config(**{"sweep.beta": (0.1, 0.2)})
  c.mesh = {"sweep": 2, "data": 4, "fsdp": 1}
  validate.validate(c)
  c.data.batch_size = 6
  with pytest.raises(validate.ConfigError, match="not divisible by the mesh size 4"):
    validate.validate(c)
