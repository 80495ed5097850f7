"""Every config builds, in its real and its :runlocal form, and passes the loop's checks."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = ("violence", "oversexualization", "plausibility", "alignment", "draft")


def load(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", TRAINING)
def test_training_configs(name):
  module = load(name)
  real, local = module.get_config(), module.get_config("runlocal")
  assert real.model.path == "" and local.model.path == "tiny"
  assert real.lora.init == "" and real.model.lora == ""  # a fresh LoRA; no LoRA to sample with
  assert local.train.num_steps <= 10 and local.sampling.num_steps <= 5
  assert "python -m fnf_jax.main --config=configs/" in module.__doc__
  with pytest.raises(ValueError, match="runlocal"):
    module.get_config("bogus")


def test_draft_is_focus_n_fix_with_ones_mask_and_no_constraint():
  c = load("draft").get_config()
  assert c.objective.mask == "ones" and c.objective.beta == 0 and c.objective.gamma == 0
  assert load("violence").get_config().objective.mask == "heatmap"


def test_sample_config():
  c = load("sample").get_config()
  assert c.job == "sample" and c.sampling.num_steps == 50 and c.model.lora == ""
