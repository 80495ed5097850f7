"""Pretrains the toy world's latent diffusion model (the weights `make demo` starts from).

    python -m fnf_jax.main --config=configs/toy_pretrain.py --workdir=/tmp/toy_pretrain

writes WORKDIR/pipeline (a diffusers-format folder: unet, vae, text_encoder, tokenizer,
scheduler), WORKDIR/toy_defect.safetensors (the reward model), sample grids and
sample_report.jsonl (the judge's colour / shape / defect rates on fresh samples), and per
stage (vae, reward, unet) WORKDIR/<stage>/ with its checkpoints and metrics.jsonl. The shipped
weights are copies of those:

    rm -rf fnf_jax/assets/toy_pipeline
    cp -r /tmp/toy_pretrain/pipeline fnf_jax/assets/toy_pipeline
    cp /tmp/toy_pretrain/toy_defect.safetensors fnf_jax/assets/

On a 2-core CPU: VAE 11 min, reward 6 min, UNet 42 min (BENCHMARKS.md). A stopped run picks up
from WORKDIR (a finished stage is skipped, a stopped one resumes from its newest checkpoint);
`:runlocal` is the few-step variant the tests run.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import focus_n_fix  # noqa: E402  pylint: disable=g-import-not-at-top  (the shared compile block)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "pretrain"
  c.seed = 0  # parameter init and the noise / timestep / caption-dropout streams
  c.data_seed = 0  # the world's images: training uses indices from 0 up, evaluation 10**9 up
  c.defect_rate = 0.3  # share of training images with a blotch; the model should copy it
  c.export_every = 1000  # UNet stage: EMA weights -> WORKDIR/pipeline, plus samples judged
  c.compile = focus_n_fix.compile_config()  # the persistent compilation cache, XLA flags
  # Each stage's checkpoints (its params and optimizer state; the UNet's EMA too), for resuming:
  # WORKDIR/<stage>/checkpoints.
  c.checkpoint = focus_n_fix.checkpoint_config(every=500, keep=2)
  c.log = ml_collections.ConfigDict()  # WORKDIR/<stage>/metrics.jsonl and tensorboard/
  c.log.every = 100
  c.log.tensorboard = True

  c.vae = ml_collections.ConfigDict()
  c.vae.steps = 2000
  c.vae.batch_size = 16
  c.vae.lr = 2e-3
  c.vae.warmup_steps = 100
  c.vae.weight_decay = 0.0
  c.vae.kl_weight = 1e-6  # SD's VAE weight: a near-deterministic autoencoder with a smooth latent
  c.vae.defect_weight = 10.0  # extra L1 weight on blotch pixels (the detail that must survive)
  c.vae.defect_rate = 0.5  # the VAE is not generative: show it more blotches
  c.vae.report_every = 500  # judge's defect recall on reconstructions, logged during training
  c.vae.min_defect_recall = 0.9  # stop before the UNet stage if the VAE loses the defect

  c.reward = ml_collections.ConfigDict()  # the toy_defect reward model
  c.reward.steps = 300
  c.reward.batch_size = 32  # (each step also sees the 32 VAE reconstructions)
  c.reward.lr = 2e-3
  c.reward.warmup_steps = 50
  c.reward.weight_decay = 0.0

  c.unet = ml_collections.ConfigDict()
  c.unet.steps = 3000
  c.unet.batch_size = 32
  c.unet.lr = 5e-4
  c.unet.warmup_steps = 200
  c.unet.weight_decay = 0.01
  c.unet.caption_dropout = 0.1  # captions replaced by "" (what CFG's unconditional branch sees)
  c.unet.ema_decay = 0.998

  c.eval = ml_collections.ConfigDict()
  c.eval.seeds = 8  # samples per caption (12 captions) at each export
  c.eval.batch_size = 48
  c.eval.num_steps = 20
  c.eval.guidance_scale = 3.0

  if arg == "runlocal":  # a few steps of everything, for tests
    c.log.every = c.checkpoint.every = c.export_every = 2
    c.vae.steps = c.unet.steps = c.reward.steps = 3
    c.vae.min_defect_recall = 0.0
    c.vae.batch_size = c.unet.batch_size = c.reward.batch_size = 4
    c.vae.warmup_steps = c.unet.warmup_steps = c.reward.warmup_steps = 1
    c.eval.seeds, c.eval.batch_size, c.eval.num_steps = 1, 12, 2
  elif arg is not None:
    raise ValueError(f"unknown config argument {arg!r}; valid: 'runlocal' (or none)")
  return c
