"""Train a heatmap reward model (RAHF) on RichHF-18K, then score it: the train_reward job.

    python -m fnf_jax.main --config=configs/rahf.py --workdir=/tmp/rahf
    python -m fnf_jax.main --config=configs/rahf.py --config.job=eval_reward --workdir=/tmp/rahf

Data: RichHF-18K's three TFRecord files plus the Pick-a-Pic images and captions they name, in
data.manual_dir (fnf_jax/data/richhf18k.py says what goes there; tools/extract_pickapic.py
writes the images). The TFDS build runs once, into data.data_dir.
Model: RAHF (Liang et al., CVPR 2024) from the pretrained ViT-L/16 at 384² and t5-base folders
(model.vit_path / model.t5_path, with their model.safetensors), new heads; all six heads train.
The end: WORKDIR/export/rahf.safetensors, the file the rahf_plausibility / rahf_alignment
rewards read (their reward.weights, with the same two folders), and WORKDIR/eval/test.json /
test.html with RAHF's metrics. Anchors, README "Training a heatmap reward model".

Variants:
  :runlocal   a tiny random RAHF (64² images) on data.manual_dir's RichHF layout, 300 steps
              (about 2 min on 2 CPU cores; the tests' config (make test-slow): point
              data.manual_dir at a mini RichHF)
  :toy        the toy world's defect reward (fnf_jax/toy): its generated `toy_defects` data,
              no manual files, the same trainer; the export is a toy_defect reward file
  :toy_tiny   :toy with the dataset's tiny builder config and a few steps (tests)
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import focus_n_fix  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "train_reward"  # train_reward | eval_reward (scores eval.weights on eval.split)
  c.seed = 0  # the data order (each epoch a permutation drawn from (seed, epoch))
  c.distributed = focus_n_fix.distributed_config()  # several hosts: see that function
  c.compile = focus_n_fix.compile_config()  # the persistent compilation cache, XLA flags

  c.data = ml_collections.ConfigDict()
  c.data.name = "richhf18k"  # richhf18k | toy_defects (fnf_jax/data/reward_data.py)
  c.data.manual_dir = "data/richhf18k"  # the downloaded files (unused by generated datasets)
  c.data.data_dir = ""  # where the TFDS build goes; "" = WORKDIR/tfds (built by process 0)
  c.data.builder_config = ""  # a TFDS builder config name ("" = the builder's default)
  c.data.batch_size = 64  # global; the reimplementation trains with 64
  # grain worker processes decoding images ahead of the devices; 0 = grain's reader threads in
  # this process, faster on a 2-core machine (BENCHMARKS.md), slower on a many-core host.
  c.data.workers = 2

  c.model = ml_collections.ConfigDict()
  c.model.name = "rahf"  # rahf | toy_defect (fnf_jax/rewards/trainable.py)
  c.model.vit_path = "/models/vit-large-patch16-384"  # transformers ViT folder, with weights
  c.model.t5_path = "/models/t5-base"  # transformers T5 folder, with weights and tokenizer.json
  c.model.weights = ""  # "" = the two folders + new heads; a RAHF file = go on from it; "tiny"
  c.model.dtype = "bfloat16"  # compute dtype (params and optimizer state stay float32)
  c.model.remat = True  # recompute each ViT / T5 layer in the backward pass
  c.model.max_prompt_tokens = 128  # T5 tokens of the prompt (padded, masked; longer truncated)
  c.model.seed = 0  # the new heads' initialisation

  c.loss = ml_collections.ConfigDict()
  c.loss.heatmap = "mse"  # per-pixel loss of the heatmaps: mse (RAHF's) | bce
  c.loss.heatmap_weight = 1.0  # Σ over heatmap heads of the per-pixel loss
  c.loss.score_weight = 1.0  # Σ over score heads of the MSE

  c.optim = focus_n_fix.optim_config(lr=1e-4, schedule="cosine", warmup_steps=500,
                                     decay_steps=20000, weight_decay=0.01)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 20000  # about 80 epochs of RichHF-18K's 15,810 training examples

  focus_n_fix.layout(c)  # the fine-tuning configs' mesh and sharding rules
  c.checkpoint = focus_n_fix.checkpoint_config(every=1000, keep=3)

  c.log = ml_collections.ConfigDict()
  c.log.every = 50
  c.log.image_every = 1000  # TensorBoard panels image | true | predicted heatmap (0: never)
  c.log.tensorboard = True

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"  # richhf18k: dev | test; toy_defects: test
  c.eval.batch_size = 64
  c.eval.weights = ""  # "" = WORKDIR/export/<file>; "init" = the untrained start; or a file
  c.eval.threshold = 0.0  # a ground-truth pixel above it is a "fixation" (CC, NSS, AUC-Judd)
  c.eval.html_examples = 16  # examples shown in WORKDIR/eval/<split>.html

  if arg in ("runlocal", "toy_tiny"):
    c.data.batch_size = c.eval.batch_size = 8
    c.data.workers = 0
    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 3e-3, "constant", 5
    c.train.num_steps = 60
    c.checkpoint.every, c.checkpoint.keep = 20, 2
    c.log.every, c.log.image_every = 10, 30
    c.log.tensorboard = False
    c.eval.html_examples = 4
  if arg == "runlocal":
    # 300 steps: what the tiny model needs to find the maps painted into the mini RichHF's
    # images (tests/richhf_fixture.py); BCE and a light score weight, with which it does so
    # reliably (with RAHF's MSE it often settles on empty heatmaps first).
    c.train.num_steps, c.optim.lr, c.optim.warmup_steps = 300, 1e-3, 20
    c.loss.heatmap, c.loss.score_weight = "bce", 0.1
    c.model.weights = "tiny"
    c.model.vit_path = c.model.t5_path = ""
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.max_prompt_tokens = 16
  elif arg in ("toy", "toy_tiny"):
    c.data.name = "toy_defects"
    c.data.manual_dir = ""
    c.model = ml_collections.ConfigDict({"name": "toy_defect", "weights": "", "seed": 0})
    c.loss.heatmap = "bce"  # a blotch is ~2% of the pixels: MSE learns "no defect anywhere"
    c.eval.split = "test"
    if arg == "toy":
      c.data.batch_size, c.train.num_steps, c.optim.lr = 32, 600, 2e-3
      c.optim.warmup_steps, c.optim.decay_steps = 50, 600
    else:
      c.data.builder_config = "tiny"
      c.optim.lr = 2e-3
  elif arg is not None:
    raise ValueError(f"unknown config argument {arg!r}; valid: runlocal, toy, toy_tiny (or none)")
  return c
