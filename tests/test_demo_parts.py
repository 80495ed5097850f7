"""The demo's parts that need no trained model: metrics, report, the toy_defect reward, the
pretraining job (a few steps of each stage) and the demo's method configs."""

import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax.jobs import evaluate as eval_job
from fnf_jax.evaluation import report as eval_report
from fnf_jax.evaluation import metrics as evaluation
from fnf_jax import main as main_lib
from fnf_jax.diffusion import pipeline
from fnf_jax.data import examples as examples_lib
from fnf_jax.diffusion import random_models
from fnf_jax.models import vae as vae_lib
from fnf_jax.rewards import registry
from fnf_jax.runtime import loop as loop_lib
from fnf_jax.toy import demo
from fnf_jax.toy import methods
from fnf_jax.toy import models as toy_models
from fnf_jax.toy import pretrain
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


def _toy_out(n, **images):
  """The eval job's samples for n toy examples: the world's images (half with a blotch) as the
  base model's, each of `images` as a method's; rewards all zero."""
  data = toy_world.batch(range(n), defect_rate=0.5)
  out = {"reference": data["image"], "mask": np.zeros((n, 32, 32), np.float32),
         **{f"images/{m}": im for m, im in images.items()}}
  for m in ("base", *images):
    out[f"score/target/{m}"] = np.zeros(n, np.float32)
  examples = [examples_lib.Example(i, c, i) for i, c in enumerate(data["caption"])]
  return data, out, examples


def test_the_analytic_judge_is_one_more_metric_of_the_eval_job():
  clean = toy_world.batch(range(40), defect_rate=0.0)["image"]
  blank = np.full_like(clean, 0.9)  # no shape at all: fidelity 0 for every image
  data, out, examples = _toy_out(40, clean=clean, blank=blank)
  config = toy_config.get_config()
  result = eval_job.metrics(config, out, ["clean", "blank"], examples, {})
  has = np.asarray(data["has_defect"])
  np.testing.assert_array_equal(out["problem/base"], has)
  assert result["judge"]["name"] == "toy" and result["judge"]["kind"] == "analytic"
  base, good, bad = (result["methods"][m] for m in ("base", "clean", "blank"))
  assert base["problem_rate"] == pytest.approx(has.mean())
  assert good["problem_rate"] == 0.0 and good["fixed_rate"] == 1.0
  assert good["new_problem_rate"] == 0.0
  assert good["judge/prompt_fidelity"] == {"mean": 1.0, "change": 0.0, "change_se": 0.0}
  assert bad["judge/prompt_fidelity"]["change"] == -1.0 and bad["fixed_rate"] == 1.0
  assert bad["judge/color_right"]["mean"] == 0.0 and "judge/has_defect" not in bad


def test_a_reward_judges_by_its_threshold():
  _, out, examples = _toy_out(4, fnf=np.zeros((4, 32, 32, 3), np.float32))
  out["score/target/base"] = np.asarray([-1.0, -1.0, 1.0, 1.0], np.float32)
  out["score/target/fnf"] = np.asarray([1.0, -1.0, -1.0, 1.0], np.float32)
  config = toy_config.get_config()
  config.eval.judge, config.eval.judge_threshold = "", 0.0
  fnf = eval_job.metrics(config, out, ["fnf"], examples, {})["methods"]["fnf"]
  assert (fnf["problem_rate"], fnf["fixed_rate"], fnf["new_problem_rate"]) == (0.5, 0.5, 0.5)
  assert not any(k.startswith("judge/") for k in fnf)


def test_report_table_html_and_grid(tmp_path):
  rng = np.random.default_rng(0)
  n = 5
  _, out, examples = _toy_out(n, draft=rng.uniform(size=(n, 32, 32, 3)),
                              fnf=rng.uniform(size=(n, 32, 32, 3)))
  out["mask"][2, 5:9, 5:9] = 1.0
  result = eval_job.metrics(toy_config.get_config(), out, ["draft", "fnf"], examples, {})
  result["setup"] = {"train_steps": 60}
  logs = tmp_path / "fnf.jsonl"
  logs.write_text("".join(json.dumps({"step": s, "reward": -s, "change_outside": s / 10}) + "\n"
                          for s in (5, 10)))
  folder = eval_report.write(str(tmp_path / "report"), result, out, examples,
                             {"fnf": str(logs), "draft": str(tmp_path / "missing.jsonl")},
                             rows=3, seed=0, labels=demo.NAMES, title="toy")
  page = open(os.path.join(folder, "index.html"), encoding="utf-8").read()
  assert "Focus-N-Fix" in page and "<polyline" in page and "grid.png" in page
  assert "prompt fidelity (judge)" in page and "train_steps" in page and "blotch" in page
  saved = json.load(open(os.path.join(folder, "metrics.json")))
  assert saved["methods"]["draft"]["psnr_outside"] == result["methods"]["draft"]["psnr_outside"]
  lines = demo.table_text(result).splitlines()
  assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["method"] + [
      t for _, t, _ in demo.COLUMNS]
  assert lines[2].startswith("| base ") and "—" in lines[2]  # no PSNR of the base vs itself
  assert lines[4].startswith("| Focus-N-Fix ")
  fidelity = result["methods"]["fnf"]["judge/prompt_fidelity"]["mean"]
  assert lines[4].rstrip(" |").endswith(f"{fidelity:.3f}")
  assert eval_report.grid_rows(out["mask"], 3)[0] == 2  # the example with a mask first


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


def _batches(monkeypatch, stops=()) -> list:
  """Records the (stage, step) of every training batch the pretrain job makes; while making
  the batch of a (stage, step) in `stops` (once each) it sends this process SIGTERM, as a
  preemption would: the loop then saves that step's checkpoint and raises `Preempted`."""
  made, pending, original = [], set(stops), pretrain.images_batch

  def images_batch(step, batch_size, cfg, defect_rate=None, offset=0):
    # The stages' slices of the world: the reward's from 10**8 up, the UNet's at its defect rate.
    stage = "reward" if offset else "unet" if defect_rate is None else "vae"
    made.append((stage, step))
    if (stage, step) in pending:
      pending.discard((stage, step))
      os.kill(os.getpid(), signal.SIGTERM)
    return original(step, batch_size, cfg, defect_rate, offset)

  monkeypatch.setattr(pretrain, "images_batch", images_batch)
  return made


def _steps(folder) -> list[int]:
  """The checkpoint steps in a stage's folder."""
  return sorted(int(n) for n in os.listdir(os.path.join(folder, "checkpoints")) if n.isdigit())


def _same_bytes(a, b, names) -> None:
  for name in names:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_stopped_pretrain_stage_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path,
                                                                                monkeypatch):
  """The reward stage on the shared loop (runlocal: 3 steps, checkpoints every 2): SIGTERM
  during step 1 saves step 1 and stops; the next run resumes there (steps 2 and 3 only) and
  writes the same weights as a run that was not stopped; a finished stage is not trained again."""
  config = toy_pretrain.get_config("runlocal")
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(toy_models.vae_config()))
  abstract = jax.eval_shape(vae.init, jax.random.key(0), vae_lib.dummy_images(vae.config))
  vae_params = jax.tree.map(jnp.asarray, random_models.init_params(abstract["params"], 0))
  monkeypatch.setattr(pretrain, "reward_report", lambda *a, **k: {})  # 512 images: slow
  whole, stopped = tmp_path / "whole", tmp_path / "stopped"
  pretrain.train_reward(config, str(whole), vae_params)
  assert _steps(whole / "reward") == [2, 3]

  made = _batches(monkeypatch, stops=[("reward", 0)])
  with pytest.raises(loop_lib.Preempted) as stop:
    pretrain.train_reward(config, str(stopped), vae_params)
  assert stop.value.step == 1 and stop.value.code == 143
  assert _steps(stopped / "reward") == [1] and not (stopped / "toy_defect.safetensors").exists()
  del made[:]
  pretrain.train_reward(config, str(stopped), vae_params)
  assert made == [("reward", 1), ("reward", 2)]  # resumed at step 1, not started over
  _same_bytes(whole, stopped, ["toy_defect.safetensors"])
  logged = [json.loads(l)["step"] for l in open(stopped / "reward" / "metrics.jsonl")]
  assert logged == [json.loads(l)["step"] for l in open(whole / "reward" / "metrics.jsonl")]
  del made[:]
  pretrain.train_reward(config, str(stopped), vae_params)  # finished: read back
  assert made == []


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A workdir of the whole `pretrain` job (runlocal), run without a stop."""
  folder = tmp_path_factory.mktemp("pretrained")
  main_lib.run_job(toy_pretrain.get_config("runlocal"), str(folder))
  return folder


WEIGHTS = ["vae.msgpack", "toy_defect.safetensors",
           "pipeline/unet/diffusion_pytorch_model.safetensors",
           "pipeline/vae/diffusion_pytorch_model.safetensors",
           "pipeline/text_encoder/model.safetensors"]


# ~50-100 s: the one-time job that made the shipped toy model (fnf_jax/assets); the shipped
# model itself is loaded and used by the fast tests. `make test-slow`.
@pytest.mark.slow
def test_pretrain_job_runs_every_stage(pretrained, monkeypatch):
  """`python -m fnf_jax.main --config=configs/toy_pretrain.py:runlocal`: a few steps of each stage
  give a folder that pipeline.load reads, reward weights, and the judge's sample report."""
  pipe = pipeline.load(str(pretrained / "pipeline"))
  assert pipe.image_size == 32 and pipe.latent_shape == (16, 16, 4)
  assert pipe.vae.config.scaling_factor != 1.0  # set from the trained encoder's latents
  toy_defect.load(str(pretrained / "toy_defect.safetensors"))
  reports = [json.loads(l) for l in open(pretrained / "sample_report.jsonl")]
  assert [r["step"] for r in reports] == [2, 3] and reports[-1]["images"] == 12
  vae_report = json.load(open(pretrained / "vae_report.json"))
  assert 0 <= vae_report["defect_recall"] <= 1
  for stage in ("vae", "reward", "unet"):  # checkpoints every 2 steps and at the end
    assert _steps(pretrained / stage) == [2, 3], stage
  # A second run: every stage's output is there, nothing is trained again.
  made, before = _batches(monkeypatch), os.path.getmtime(pretrained / "unet" / "checkpoints")
  main_lib.run_job(toy_pretrain.get_config("runlocal"), str(pretrained))
  assert made == [] and os.path.getmtime(pretrained / "unet" / "checkpoints") == before
  assert len(open(pretrained / "sample_report.jsonl").readlines()) == 2


# ~60-200 s: the job stopped by SIGTERM in two stages and run again until it ends.
@pytest.mark.slow
def test_a_stopped_pretrain_job_ends_as_an_uninterrupted_one(pretrained, tmp_path, monkeypatch):
  """SIGTERM during the VAE's first step, then during the UNet's: each run saves and exits with
  status 143, the next resumes that stage from its checkpoint (the UNet's export at step 2 then
  happens in the resumed run), and the weights and sample reports are byte for byte those of
  the run that was not stopped."""
  config = toy_pretrain.get_config("runlocal")
  made = _batches(monkeypatch, stops=[("vae", 0), ("unet", 0)])
  for stage in ("vae", "unet"):
    with pytest.raises(loop_lib.Preempted) as stop:
      main_lib.run_job(config, str(tmp_path))
    assert stop.value.step == 1 and _steps(tmp_path / stage) == [1], stage
  assert made.count(("vae", 0)) == made.count(("unet", 0)) == 1  # resumed, not started over
  assert ("vae", 1) in made and not (tmp_path / "sample_report.jsonl").exists()
  main_lib.run_job(config, str(tmp_path))
  assert made.count(("unet", 0)) == 1 and made[-2:] == [("unet", 1), ("unet", 2)]
  _same_bytes(pretrained, tmp_path, WEIGHTS + ["vae_report.json", "sample_report.jsonl",
                                               "samples_000002.png", "samples_000003.png"])
