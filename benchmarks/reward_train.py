"""Benchmarks of the heatmap reward trainer (fnf_jax/jobs/train_reward.py): its data and its step.

  python benchmarks/reward_train.py data [--examples 256 --size 384 --batch 16 --workers 2]
  python benchmarks/reward_train.py step [--model tiny --batch 8 --iters 20]

data: examples/s of the richhf18k data source through grain, decoding Pick-a-Pic-sized images
(512² PNGs, 512² maps: a generated mini RichHF-18K, tests/richhf_fixture.py) and resizing them to
--size, with --workers grain processes, beside the same decoding inline in this process (the
peer: what a loader without workers gives).
step: steps/s of the jitted train_reward step (all six RAHF heads, the paper's losses, Adam)
on the tiny RAHF of configs/rahf.py:runlocal, or "real" (ViT-L/16-384 + t5-base with random
weights: for a GPU), after two warm-up steps; the examples' decoding is not counted.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from fnf_jax.data import reward_data  # noqa: E402
from fnf_jax.data import reward_datasets  # noqa: E402
from fnf_jax.data import richhf18k  # noqa: E402
from fnf_jax.data import tfds_lib  # noqa: E402


def data(args) -> None:
  from richhf_fixture import write_mini_richhf  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory() as tmp:
    write_mini_richhf(os.path.join(tmp, "manual"), n_train=args.examples + 2, n_dev=1, n_test=1,
                      image_size=512, map_size=512)
    builder, _ = tfds_lib.prepare(richhf18k.Richhf18k, data_dir=os.path.join(tmp, "data"),
                                  manual_dir=os.path.join(tmp, "manual"))
    spec = reward_datasets.get("richhf18k")
    decode = reward_data.Decode((args.size, args.size), (args.size, args.size),
                                tuple(spec.heatmaps.items()), tuple(spec.scores.items()))
    batch_at = reward_data.TrainBatch(builder.as_data_source("train"), decode, args.batch,
                                      tuple(range(args.batch)), 0)
    steps = args.examples // args.batch
    plain = lambda: [batch_at(i) for i in range(steps)]
    tic = time.perf_counter()
    n = sum(len(b["prompt"]) for b in plain())
    print(f"richhf18k -> {args.size}², batch {args.batch}, a plain loop (no grain): "
          f"{n / (time.perf_counter() - tic):.1f} examples/s ({n} examples)")
    for workers in (0, args.workers):
      # Wall-clock of the whole stream, start-up included (grain prefetches with threads even
      # with 0 workers, so timing after the first batch would time a full buffer).
      tic = time.perf_counter()
      n = sum(len(b["prompt"]) for b in reward_data.stream(batch_at, range(steps), workers))
      rate = n / (time.perf_counter() - tic)
      print(f"richhf18k -> {args.size}², batch {args.batch}, grain, {workers} worker process(es): "
            f"{rate:.1f} examples/s ({n} examples)")


def step(args) -> None:
  import importlib.util  # pylint: disable=import-outside-toplevel
  from fnf_jax.rewards import training  # pylint: disable=import-outside-toplevel
  from fnf_jax.runtime import sharding  # pylint: disable=import-outside-toplevel
  from fnf_jax.runtime import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
  from fnf_jax.rewards import trainable  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("rahf_cfg", os.path.join(ROOT, "configs",
                                                                         "rahf.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  model = _real_rahf(config) if args.model == "real" else trainable.build(config.model)
  heads = reward_datasets.get("richhf18k")
  run = training.Setup(config, mesh, (("batch", ("data", "fsdp")),), None, [], model, None,
                           model.heatmaps, model.scores)
  rng = np.random.default_rng(0)
  b = args.batch
  host = {"image": rng.integers(0, 256, (b, *model.image_size, 3), np.uint8),
          "prompt": ["a photo of a cat holding a sign"] * b,
          **{f"heatmap/{k}": rng.integers(0, 256, (b, *model.heatmap_size), np.uint8)
             for k in heads.heatmaps},
          **{f"score/{k}": rng.random(b).astype(np.float32) for k in heads.scores}}
  opt = optimizer_lib.optimizer(config.optim)
  with mesh:
    params = sharding.put(model.init(), training.param_shardings(run))
    state = {"params": params, "opt_state": jax.jit(opt.init)(params), "step": np.int32(0)}
    batch = training.device_batch(run, host, b)
    fn = jax.jit(training.make_train_step(run, opt), donate_argnums=0)
    tic = time.perf_counter()
    for _ in range(2):  # the second call compiles again: the first's outputs are laid out anew
      state, m = fn(state, batch)
    jax.block_until_ready(m)
    print(f"compile + two warm-up steps: {time.perf_counter() - tic:.1f} s")
    times = []
    for _ in range(args.iters):
      tic = time.perf_counter()
      state, m = fn(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - tic)
  t = statistics.median(times)
  print(f"train_reward step, RAHF {args.model}, batch {b}, {jax.devices()[0].platform}: "
        f"{t * 1000:.1f} ms/step, {1 / t:.2f} steps/s, {b / t:.1f} examples/s")


def _real_rahf(config):
  """The real geometry (ViT-L/16-384, t5-base) with random weights: no folders needed."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fnf_jax.models import rahf as rahf_lib, t5, vit  # pylint: disable=import-outside-toplevel
  from fnf_jax.rewards import rahf as rahf_reward  # pylint: disable=import-outside-toplevel
  from fnf_jax.rewards import trainable  # pylint: disable=import-outside-toplevel
  rc = rahf_lib.RAHFConfig(vit.PRESETS["vit-large-patch16-384"], t5.PRESETS["t5-base"])
  model = rahf_lib.RAHF(rc, dtype=jnp.bfloat16, remat=True)
  gh, gw = rc.grid

  def apply(p, images, ids):
    pixels = rahf_reward.preprocess(images, rc.vit.image_size, (0.5,) * 3, (0.5,) * 3)
    ids = jnp.asarray(ids)
    heat, scores = model.apply({"params": p}, pixels.astype(jnp.bfloat16), ids, ids != 0)
    return ({k: v.astype(jnp.float32) for k, v in heat.items()},
            {k: v.astype(jnp.float32) for k, v in scores.items()})

  return trainable.Trainable(
      name="rahf", heatmaps=rc.heads.heatmaps, scores=rc.heads.scores,
      image_size=tuple(rc.vit.image_size), heatmap_size=(16 * gh, 16 * gw),
      init=lambda: rahf_lib.init_params(rc, 0), abstract=lambda: rahf_lib.abstract_params(rc),
      apply=apply, save=None, load=None, export_name="",
      tokenize=lambda prompts: np.ones((len(prompts), config.model.max_prompt_tokens), np.int32))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("what", choices=("data", "step"))
  parser.add_argument("--examples", type=int, default=256)
  parser.add_argument("--size", type=int, default=384)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--model", choices=("tiny", "real"), default="tiny")
  parser.add_argument("--iters", type=int, default=20)
  args = parser.parse_args()
  (data if args.what == "data" else step)(args)


if __name__ == "__main__":
  main()
