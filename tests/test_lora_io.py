"""LoRAs both ways (fnf_jax/models/lora_io.py): our export in diffusers, diffusers' / peft's
files in `Pipeline.generate`, tools/merge_lora.py's folder in diffusers, the sample job's
model.lora and training from a LoRA (lora.init). Images are compared on the shipped toy
pipeline from the same x_T, with guidance."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax import traverse_util
from PIL import Image

from fnf_jax.runtime import checkpoint
from fnf_jax.diffusion import pipeline
from fnf_jax.diffusion import random_models
from fnf_jax.runtime import resume as record
from fnf_jax.fnf import run as run_lib
from fnf_jax.jobs import train
from fnf_jax.config import validate
from fnf_jax.data import examples
from fnf_jax.models import lora as lora_lib
from fnf_jax.models import lora_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "fnf_jax", "assets", "toy_pipeline")
PROMPTS = ["a red circle", "a blue triangle"]
STEPS, GUIDANCE = 2, 2.0
RANK, ALPHA = 4, 8.0  # alpha != rank: a loader that drops alpha gets other images
TOL = 2e-3


def _random_lora(unet_params, seed=0, size=0.3):
  """A trained-like LoRA on the default targets: A and B random, |ΔW| a fraction of |W|."""
  rng = np.random.default_rng(seed)
  tree = lora_lib.init(jax.random.key(seed), unet_params, rank=RANK)
  return jax.tree.map(
      lambda x: (rng.standard_normal(x.shape) * size / np.sqrt(x.shape[0])).astype(np.float32),
      tree)


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _assert_same_tree(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg="/".join(key))


@pytest.fixture(scope="module")
def ours():
  return pipeline.load(TOY)


@pytest.fixture(scope="module")
def latents(ours):
  # The sample job's x_T for seed 0 (one per prompt).
  return np.stack([examples.initial_noise(0, ours.latent_shape)] * len(PROMPTS))


@pytest.fixture(scope="module")
def base_images(ours, latents):
  return ours.generate(PROMPTS, latents=latents, num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE)


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
  """(tree, path) of a trained-like LoRA written by our export."""
  tree = _random_lora(ours.params["unet"])
  path = str(tmp_path_factory.mktemp("ours") / "lora.safetensors")
  checkpoint.export_lora_safetensors(tree, path, alpha=ALPHA, rank=RANK)
  return tree, path


def _diffusers(folder=TOY):
  import diffusers  # pylint: disable=import-outside-toplevel
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _images(ref, latents):
  with torch.no_grad():
    return ref(PROMPTS, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np").images


def _generate(ours, latents, **lora):
  return ours.generate(PROMPTS, latents=latents, num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, **lora)


@pytest.fixture(scope="module")
def diffusers_with_ours(exported, latents):
  """diffusers' images with our exported LoRA (load_lora_weights), and that pipeline."""
  ref = _diffusers()
  folder, name = os.path.split(exported[1])
  ref.load_lora_weights(folder, weight_name=name)
  return _images(ref, latents), ref


def test_our_export_in_diffusers_gives_our_images(ours, exported, latents, base_images,
                                                  diffusers_with_ours):
  expected, _ = diffusers_with_ours
  got = _generate(ours, latents, lora=exported[1])
  assert np.abs(got - expected).max() <= TOL
  assert np.abs(got - base_images).max() > 0.05  # the LoRA does change the images
  # The tree itself with its scale: the same compiled sampler, the same images.
  np.testing.assert_array_equal(
      _generate(ours, latents, lora=exported[0], lora_scale=ALPHA / RANK), got)


def _peft_lora(ref, seed=1):
  """A peft LoRA (rank 4, alpha 8) on the diffusers UNet's attention projections, with random
  A and B set by hand; returns its LoraConfig."""
  from peft import LoraConfig  # pylint: disable=import-outside-toplevel
  config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False,
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])
  ref.unet.add_adapter(config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in ref.unet.modules():
      if hasattr(module, "lora_A") and "default" in module.lora_A:
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        a.copy_(torch.randn(a.shape, generator=gen) * 0.3 / a.shape[1] ** 0.5)
        b.copy_(torch.randn(b.shape, generator=gen) * 0.3 / RANK ** 0.5)
  return config


def test_peft_lora_saved_by_diffusers_gives_diffusers_images(ours, latents, base_images,
                                                             diffusers_with_ours, tmp_path):
  from diffusers import StableDiffusionPipeline  # pylint: disable=import-outside-toplevel
  from peft.utils import get_peft_model_state_dict  # pylint: disable=import-outside-toplevel
  peft_pipe = _diffusers()
  config = _peft_lora(peft_pipe)
  expected = _images(peft_pipe, latents)  # the peft model itself: scale alpha / r = 2
  layers = get_peft_model_state_dict(peft_pipe.unet)
  StableDiffusionPipeline.save_lora_weights(str(tmp_path / "meta"), unet_lora_layers=layers,
                                            unet_lora_adapter_metadata=config.to_dict())
  StableDiffusionPipeline.save_lora_weights(str(tmp_path / "bare"), unet_lora_layers=layers)
  # A folder holding diffusers' pytorch_lora_weights.safetensors is a source too.
  got = _generate(ours, latents, lora=str(tmp_path / "meta"))
  assert np.abs(got - expected).max() <= TOL
  assert np.abs(got - base_images).max() > 0.05

  # No alpha in the file: alpha = rank (scale 1) on both sides, other images than scale 2.
  tree, scale = lora_io.load(str(tmp_path / "bare"), ours.params["unet"])
  assert scale == 1.0
  _, ref = diffusers_with_ours
  ref.unload_lora_weights()
  ref.load_lora_weights(str(tmp_path / "bare"))
  bare = _generate(ours, latents, lora=tree, lora_scale=scale)
  assert np.abs(bare - _images(ref, latents)).max() <= TOL
  assert np.abs(bare - got).max() > 0.01


def test_merged_folder_loads_in_diffusers_with_the_lora_images(exported, latents,
                                                               diffusers_with_ours, tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import merge_lora  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "merged")
  merge_lora.main([TOY, exported[1], "--out", out])
  assert np.abs(_images(_diffusers(out), latents) - diffusers_with_ours[0]).max() <= TOL
  with open(os.path.join(TOY, "vae", "diffusion_pytorch_model.safetensors"), "rb") as a, \
      open(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"), "rb") as b:
    assert a.read() == b.read()  # everything but the UNet is copied as it is
  with pytest.raises(SystemExit, match="exists; pass --overwrite"):
    merge_lora.main([TOY, exported[1], "--out", out])


# --- bad input: the message names the key and both shapes -------------------------------------
def _write(path, tensors, metadata=None):
  from fnf_jax.models import convert  # pylint: disable=import-outside-toplevel
  convert.write_safetensors(str(path), tensors, metadata)
  return str(path)


def _read(path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(path)


Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def test_keys_and_shapes_that_do_not_fit_are_named(ours, exported, tmp_path):
  unet = ours.params["unet"]
  tensors = _read(exported[1])
  d_in = tensors[f"{Q}.lora_A.weight"].shape[1]
  cases = [
      ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_z.lora_A.weight":
        np.zeros((4, d_in), np.float32),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_z.lora_B.weight":
        np.zeros((d_in, 4), np.float32)},
       rf"attn1.to_z.lora_A.weight' \(shape \(4, {d_in}\)\) is for module .* which the UNet "
       "does not have"),
      ({**tensors, f"{Q}.lora_A.weight": np.zeros((4, d_in + 1), np.float32)},
       rf"to_q.lora_A.weight' has shape \(4, {d_in + 1}\), which does not fit the UNet's "
       rf".*to_q.weight \({d_in}, {d_in}\)"),
      ({**tensors, f"{Q}.lora_B.weight": np.zeros((d_in, 3), np.float32)},
       rf"to_q.lora_B.weight' has shape \({d_in}, 3\), which does not fit the UNet's .*"
       rf"\({d_in}, {d_in}\) with lora_A \(4, {d_in}\)"),
      ({**tensors, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
        np.zeros((4, 64), np.float32)}, "is a text-encoder LoRA layer; fnf_jax fine-tunes"),
      ({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight":
        np.zeros((4, 4), np.float32)}, "kohya"),
      ({"unet.conv_in.lora_A.weight": np.zeros((4, 4, 3, 3), np.float32),
        "unet.conv_in.lora_B.weight": np.zeros((32, 4, 1, 1), np.float32)},
       r"conv kernel \(3, 3, 4, 32\): only LoRA on Linear layers"),
  ]
  for i, (bad, message) in enumerate(cases):
    with pytest.raises(ValueError, match=message):
      lora_io.load(_write(tmp_path / f"bad{i}.safetensors", bad), unet)
  tree = _random_lora(unet)
  tree["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["lora_b"] = \
      np.zeros((4, d_in + 2), np.float32)
  with pytest.raises(ValueError, match=rf"attn1/to_q: lora_a \({d_in}, 4\) / lora_b "
                     rf"\(4, {d_in + 2}\) do not fit the UNet's kernel \({d_in}, {d_in}\)"):
    ours.generate(PROMPTS, lora=tree, lora_scale=1.0)
  with pytest.raises(ValueError, match="needs lora_scale"):
    ours.generate(PROMPTS, lora=exported[0])


def test_a_pickle_lora_is_refused_with_the_command_that_converts_it(ours, exported, tmp_path):
  unet = ours.params["unet"]
  tensors = {k: torch.from_numpy(v) for k, v in _read(exported[1]).items()}
  path = str(tmp_path / "pytorch_lora_weights.bin")
  torch.save(tensors, path)  # diffusers' older save_lora_weights: a pickle in a zip
  renamed = str(tmp_path / "renamed.safetensors")  # the same bytes, known by their header
  shutil.copy(path, renamed)
  messages = []
  for source in (renamed, path):
    with pytest.raises(ValueError) as refused:
      lora_io.load(source, unet)
    messages.append(str(refused.value))
    assert messages[-1].startswith(f"{source}: a pickle file")
    assert "pickle files are not loaded (they can run code); convert it to safetensors with: " \
        "python -c \"" in messages[-1] and "not a readable" not in messages[-1]
  assert messages[0].endswith(f"and use {tmp_path}/renamed.converted.safetensors")
  # The command given converts it, and the result loads as the LoRA it holds.
  command = messages[1].split("convert it to safetensors with: ")[1].split(" and use ")[0]
  subprocess.run(shlex.split(command.replace("python", shlex.quote(sys.executable), 1)),
                 check=True, capture_output=True)
  converted = str(tmp_path / "pytorch_lora_weights.safetensors")
  assert messages[1].endswith(f"and use {converted}")
  tree, _ = lora_io.load(converted, unet)
  _assert_same_tree(tree, exported[0])


def test_lora_init_of_another_rank_or_other_layers_is_refused(ours, exported):
  unet = ours.params["unet"]
  cfg = lambda **kw: ml_collections.ConfigDict(
      {"rank": RANK, "alpha": ALPHA, "targets": lora_lib.DEFAULT_TARGETS, "init": exported[1],
       **kw})
  start = lora_io.start(cfg(), unet)
  _assert_same_tree(start, exported[0])
  with pytest.raises(validate.ConfigError, match=r"attn1/to_k has rank 4 \(lora_a \((\d+), 4\) "
                     r"\[in, r\]\), but config.lora.rank = 8 needs \(\1, 8\)"):
    lora_io.start(cfg(rank=8), unet)
  with pytest.raises(validate.ConfigError, match=r"its layers are not those config.lora.targets"
                     r" = 'attn1/to_q/kernel\$' selects: \d+ in the file only"):
    lora_io.start(cfg(targets=r"attn1/to_q/kernel$"), unet)


def test_older_key_styles_and_alpha_sources(ours, exported, tmp_path, caplog):
  unet, (tree, path) = ours.params["unet"], exported
  tensors = _read(path)
  old = {k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight"):
         v for k, v in tensors.items()}
  processors = {}
  for k, v in tensors.items():  # diffusers < 0.21: attention processors, no unet. prefix
    module, _, part = k.removeprefix("unet.").rpartition(".lora_")
    attention, _, proj = module.rpartition(".")
    if proj == "0":
      attention, proj = attention.rsplit(".", 1)[0], "to_out"
    kind = "down" if part.startswith("A") else "up"
    processors[f"{attention}.processor.{proj}_lora.{kind}.weight"] = v
  alphas = {f"{k.rsplit('.lora_A', 1)[0]}.alpha": np.float32(ALPHA)
            for k in tensors if "lora_A" in k}
  for name, file_tensors in (("old", old), ("processors", processors),
                             ("alphas", {**tensors, **alphas})):
    got, scale = lora_io.load(_write(tmp_path / f"{name}.safetensors", file_tensors,
                                     None if name != "old" else {"alpha": str(ALPHA)}), unet)
    _assert_same_tree(got, tree)
    assert scale == (ALPHA / RANK if name != "processors" else 1.0), name
  assert "assuming alpha = rank = 4" in caplog.text  # the processors file has no alpha


# --- the sample job and training from a LoRA ----------------------------------------------------
def test_sample_job_applies_model_lora(ours, exported, latents, base_images, tmp_path):
  from configs import sample as sample_config  # pylint: disable=import-outside-toplevel
  from fnf_jax import main  # pylint: disable=import-outside-toplevel
  config = sample_config.get_config()
  config.model.path, config.model.lora = TOY, exported[1]
  config.prompts.texts, config.seeds, config.batch_size = tuple(PROMPTS), (0,), len(PROMPTS)
  config.sampling.num_steps, config.sampling.guidance_scale = STEPS, GUIDANCE
  main.run_job(config, str(tmp_path))
  out = tmp_path / "samples"
  meta = json.loads((out / "samples.json").read_text())
  assert meta["lora"] == exported[1] and meta["lora_scale"] == ALPHA / RANK
  pngs = np.stack([np.asarray(Image.open(out / r["file"]), np.float32) for r in meta["images"]])
  expected = np.round(_generate(ours, latents, lora=exported[1]) * 255)
  assert np.abs(pngs - expected).max() <= 1  # 8-bit rounding of the same images
  assert np.abs(pngs - np.round(base_images * 255)).max() > 10
  config.model.lora = str(tmp_path / "nowhere.safetensors")
  with pytest.raises(validate.ConfigError, match="model.lora = .*: no such file or folder"):
    main.run_job(config, str(tmp_path / "again"))


def test_training_starts_from_lora_init(tmp_path):
  from test_train import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"train.num_steps": 1, "sampling.num_steps": 1, "data.batch_size": 2,
                          "checkpoint.every": 1})
  unet = random_models.random_pipeline(config.seed).params["unet"]  # setup's tiny model
  tree = _random_lora(unet)
  path = str(tmp_path / "start.safetensors")
  checkpoint.export_lora_safetensors(tree, path, alpha=ALPHA, rank=RANK)
  config.lora.init = path
  run = run_lib.setup(config)
  state = jax.jit(run.step.init_state)(run_lib.step_keys(config.seed)[0], run.frozen["unet"],
                                       run.step.start)
  _assert_same_tree(jax.device_get(state.lora), tree)  # step 0 is the file's LoRA
  # Through the loop: the first step's learning rate is 0 (warm-up), so the final LoRA is the
  # start; a fresh LoRA (B = 0) would give no change at step 1 (test_train).
  workdir = str(tmp_path / "run")
  last, final = train.fit(config, workdir, run=run)
  assert last["update_norm"] == 0.0 and last["change_outside"] > 0.0
  _assert_same_tree(final, tree)
  # The run's workdir is a LoRA source: its newest checkpoint, alpha from its config.json.
  loaded, scale = lora_io.load(workdir, unet)
  _assert_same_tree(loaded, tree)
  assert scale == config.lora.alpha / config.lora.rank
  # A resume may not change lora.init (model.lora, which training ignores, it may); a record
  # from before both keys existed reads as holding "".
  fresh = config.copy_and_resolve_references()
  fresh.lora.init = ""
  with pytest.raises(validate.ConfigError, match=r"lora\.init: '.*start.safetensors' -> ''"):
    record.check_resume(fresh, workdir)
  older = record.as_json(fresh)
  del older["lora"]["init"], older["model"]["lora"]
  with open(os.path.join(workdir, record.CONFIG), "w") as f:
    json.dump(older, f)
  # Checkpoints of such a run hold no settings: their record is config.json.
  for step in os.listdir(os.path.join(workdir, "checkpoints")):
    shutil.rmtree(os.path.join(workdir, "checkpoints", step, checkpoint.SETTINGS))
  fresh.model.lora = path
  assert record.check_resume(fresh, workdir) == {"model.lora": ("", path)}
