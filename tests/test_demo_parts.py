"""The demo's parts that need no trained model: metrics, report, the toy_defect reward, the
pretraining job (a few steps of each stage) and the demo's method configs."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax import main as main_lib
from fnf_jax import pipeline
from fnf_jax.rewards import registry
from fnf_jax import evaluation
from fnf_jax.toy import evaluate
from fnf_jax.toy import judge
from fnf_jax.toy import methods
from fnf_jax.toy import report
from fnf_jax.toy import reward as toy_defect
from fnf_jax.toy import world as toy_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import toy as toy_config  # noqa: E402  pylint: disable=g-import-not-at-top
import toy_pretrain  # noqa: E402  pylint: disable=g-import-not-at-top


def test_change_metrics_known_values():
  rng = np.random.default_rng(0)
  ref = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  mask = np.zeros((2, 32, 32), np.float32)
  mask[:, 10:20, 10:20] = 1.0
  same = evaluation.change(ref, ref, mask)
  assert same["psnr_outside"] is None and same["ssim_outside"] == pytest.approx(1.0)
  assert same["change_inside"] == same["change_outside"] == 0.0
  moved = ref.copy()
  moved[:, 10:20, 10:20] += 0.5  # only inside M
  m = evaluation.change(moved, ref, mask)
  assert m["psnr_outside"] is None and m["change_inside"] == pytest.approx(0.5)
  moved[:, 0] += 0.1  # one row outside M: mse = 0.01 * 32 / (32 * 32 - 100)
  m = evaluation.change(moved, ref, mask)
  assert m["psnr_outside"] == pytest.approx(10 * np.log10(1 / (0.01 * 32 / 924)), rel=1e-4)
  assert m["ssim_outside"] < 1.0


def test_ssim_matches_the_definition_on_flat_images():
  a = np.full((1, 16, 16, 3), 0.5)
  b = np.full((1, 16, 16, 3), 0.7)  # flat: SSIM = luminance term only
  want = (2 * 0.5 * 0.7 + evaluation.SSIM_C1) / (0.5**2 + 0.7**2 + evaluation.SSIM_C1)
  np.testing.assert_allclose(evaluation.ssim_map(a, b), want, rtol=1e-6)


def test_method_metrics_counts_fixed_and_new_defects():
  data = toy_world.batch(range(40), defect_rate=0.5)
  clean = toy_world.batch(range(40), defect_rate=0.0)
  has = np.asarray(data["has_defect"])
  base = judge.evaluate(data["image"], data["caption"])
  np.testing.assert_array_equal(base["has_defect"], has)
  out = evaluate.method_metrics(clean["image"], data["image"], np.zeros((40, 32, 32)),
                                data["caption"], np.zeros(40), base=base)
  assert out["defect_rate"] == 0.0 and out["fixed_rate"] == 1.0
  assert out["new_defect_rate"] == 0.0 and out["prompt_fidelity"] == 1.0
  assert out["fidelity_change"] == 0.0 and out["fidelity_change_se"] == 0.0
  blank = np.full_like(clean["image"], 0.9)  # no shape at all: fidelity 0 for every image
  worse = evaluate.method_metrics(blank, data["image"], np.zeros((40, 32, 32)), data["caption"],
                                  np.zeros(40), base=base)
  assert worse["fidelity_change"] == -1.0 and worse["fixed_rate"] == 1.0


def test_report_table_html_and_grid(tmp_path):
  rng = np.random.default_rng(0)
  n = 5
  out = {"reference": rng.uniform(size=(n, 32, 32, 3)), "mask": np.zeros((n, 32, 32)),
         "images_draft": rng.uniform(size=(n, 32, 32, 3)),
         "images_fnf": rng.uniform(size=(n, 32, 32, 3))}
  out["mask"][2, 5:9, 5:9] = 1.0
  row = {"defect_rate": 0.25, "reward": -0.3, "psnr_outside": 30.0, "ssim_outside": 0.9,
         "change_inside": 0.1, "prompt_fidelity": 0.8}
  metrics = {"base": dict(row, psnr_outside=None), "draft": row, "fnf": row}
  logs = tmp_path / "fnf.jsonl"
  logs.write_text("".join(json.dumps({"step": s, "reward": -s, "change_outside": s / 10}) + "\n"
                          for s in (5, 10)))
  folder = report.write(str(tmp_path / "report"), metrics, out, ["a red circle"] * n,
                        {"fnf": str(logs), "draft": str(tmp_path / "missing.jsonl")}, rows=3)
  page = open(os.path.join(folder, "index.html")).read()
  assert "Focus-N-Fix" in page and "<polyline" in page and "grid.png" in page
  assert json.load(open(os.path.join(folder, "metrics.json")))["draft"]["psnr_outside"] == 30.0
  text = report.table_text(metrics)
  assert text.splitlines()[2].startswith("| base ") and "—" in text.splitlines()[2]
  tiles, outlines, chosen = report.grid_images(out, 3)
  assert chosen[0] == 2 and tiles.shape == (12, 32, 32, 3) and outlines[1].any()


def test_toy_defect_reward_interface_and_errors(tmp_path):
  params = toy_defect.init(0)
  path = toy_defect.save(params, str(tmp_path / "w.safetensors"))
  cfg = toy_config.get_config().reward
  cfg.weights = path
  reward = registry.build(cfg)
  images = jnp.asarray(toy_world.batch(range(2))["image"])
  heat, score = reward.heatmap(reward.params, images, None), reward.score(reward.params, images,
                                                                           None)
  assert heat.shape == (2, 32, 32) and score.shape == (2,)
  np.testing.assert_allclose(score, -heat.sum((1, 2)) / toy_defect.BLOTCH_PIXELS, rtol=1e-5)
  with pytest.raises(FileNotFoundError, match="toy_pretrain"):
    toy_defect.load(str(tmp_path / "nope.safetensors"))
  bad = jax.tree.map(lambda x: x[..., :1], params)
  toy_defect.save(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError, match="Regenerate"):
    toy_defect.load(str(tmp_path / "bad.safetensors"))


def test_draft_config_is_fnf_with_ones_mask():
  c = toy_config.get_config()
  fnf, draft = methods.method_config(c, "fnf"), methods.method_config(c, "draft")
  assert fnf.objective.mask == "heatmap" and fnf.objective.beta > 0
  assert draft.objective.mask == "ones" and draft.objective.beta == 0.0
  assert draft.objective.reward_region == "full"
  for key in ("sampling", "lora", "train", "optim", "data", "prompts", "mask", "reward"):
    assert draft[key].to_dict() == fnf[key].to_dict(), key
  c.draft.objective.nonsense = 1.0
  with pytest.raises(KeyError, match="draft.objective.nonsense"):
    methods.method_config(c, "draft")


def test_pretrain_job_runs_every_stage(tmp_path):
  """`python -m fnf_jax.main --config=configs/toy_pretrain.py:runlocal`: a few steps of each stage
  give a folder that pipeline.load reads, reward weights, and the judge's sample report."""
  config = toy_pretrain.get_config("runlocal")
  main_lib.run_job(config, str(tmp_path))
  pipe = pipeline.load(str(tmp_path / "pipeline"))
  assert pipe.image_size == 32 and pipe.latent_shape == (16, 16, 4)
  assert pipe.vae.config.scaling_factor != 1.0  # set from the trained encoder's latents
  toy_defect.load(str(tmp_path / "toy_defect.safetensors"))
  reports = [json.loads(l) for l in open(tmp_path / "sample_report.jsonl")]
  assert [r["step"] for r in reports] == [2, 3] and reports[-1]["images"] == 12
  vae_report = json.load(open(tmp_path / "vae_report.json"))
  assert 0 <= vae_report["defect_recall"] <= 1
  # A second run resumes: every stage's output is there, nothing is trained again.
  before = os.path.getmtime(tmp_path / "unet_state.msgpack")
  main_lib.run_job(config, str(tmp_path))
  assert os.path.getmtime(tmp_path / "unet_state.msgpack") == before
