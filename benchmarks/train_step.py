"""Benchmark of the Focus-N-Fix training step: build, compile, first step, images/s, memory.

  python benchmarks/train_step.py --model tiny|sd15 --batch 4 --steps 50 --grad_steps 2 \
      --rank 64 --dtype bfloat16 --attention auto --iters 3
  python benchmarks/train_step.py --loop 60     # the whole training loop, tiny models
  python benchmarks/train_step.py --sweep 4     # a 4-setting sweep's step against 4 steps

--sweep N compiles the step of a sweep of N β values (fnf_jax/fnf/sweep.py: N LoRAs, one
frozen model) and the single step, then times rounds of one sweep step against N single steps,
interleaved: what sharing the frozen forward passes (prompt encoding, reference, one batched
UNet call instead of N) saves.

--loop N runs the real loop (`train.fit`, configs/violence.py:runlocal with N steps) twice in
one process: synchronous (data.prefetch = 0, metrics fetched every step: the loop before it
overlapped) and overlapped (prefetch 2, metrics fetched every 10 steps), and prints the
images/s of each over the steps after compiling.

Random weights of the chosen shapes (no checkpoint needed), the real `train_step.build` step
compiled as the training loop compiles it (step_program.compile_step, on one device), the
cached-reference batch with a random non-zero Î0 and M (so the reference sampler is not
compiled: the cache job's work), the `color` pixel reward (the PyTorch peer's kind of reward).
One JSON line per stage as soon as it is measured (benchmarks/results.py; $RESULTS or --json):
build s, compile s (and the persistent cache's hit or miss), first step s, then the median of
--iters timed steps: s per step, images/s, peak GiB.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import numpy as np  # noqa: E402

from results import emit  # noqa: E402  (benchmarks/results.py)
from fnf_jax.diffusion import random_models  # noqa: E402
from fnf_jax.runtime import sharding  # noqa: E402
from fnf_jax.fnf import step_program  # noqa: E402
from fnf_jax.fnf import train_step  # noqa: E402
from fnf_jax.rewards import registry  # noqa: E402

MODELS = {"tiny": {}, "sd15": dict(unet=random_models.SD15_UNET, vae=random_models.SD15_VAE,
                                   text=random_models.SD15_TEXT)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=sorted(MODELS), default="tiny")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--grad_steps", type=int, default=2, help="K")
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--attention", choices=("auto", "xla", "chunked", "cudnn", "splash"),
                 default="auto")
  p.add_argument("--iters", type=int, default=3, help="timed steps after the first")
  p.add_argument("--json", default=None, help="also append the JSON lines here")
  p.add_argument("--loop", type=int, default=0, help="steps of the whole-loop comparison")
  p.add_argument("--sweep", type=int, default=0, help="N > 0: the step of a sweep of N β "
                 "settings against N separate steps, interleaved in one process")
  return p.parse_args(argv)


def loop_benchmark(steps: int) -> None:
  import tempfile  # pylint: disable=g-import-not-at-top
  import violence  # pylint: disable=g-import-not-at-top  (configs/, on sys.path above)
  from fnf_jax.jobs import train  # pylint: disable=g-import-not-at-top

  for name, prefetch, log_every in (("synchronous", 0, 1), ("overlapped", 2, 10)):
    c = violence.get_config("runlocal")
    c.train.num_steps, c.checkpoint.every, c.log.image_every = steps, 10**6, 0
    c.log.tensorboard, c.log.every, c.data.prefetch = False, log_every, prefetch
    c.mesh = {"data": 1, "fsdp": 1}
    with tempfile.TemporaryDirectory() as workdir:
      tic = time.perf_counter()
      train.fit(c, workdir)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    print(f"loop {name:11s} (prefetch {prefetch}, fetch every {log_every:2d}): "
          f"{rows[-1]['images_per_second']:.2f} images/s over {steps} steps after compiling "
          f"(batch {c.data.batch_size}; job {time.perf_counter() - tic:.1f} s)")


def config_for(args):
  import focus_n_fix  # pylint: disable=g-import-not-at-top  (configs/, on sys.path above)

  c = focus_n_fix.base_config()
  c.sampling.num_steps, c.sampling.guidance_scale = args.steps, args.guidance
  c.train.grad_steps, c.train.reference = args.grad_steps, "cache"
  c.lora.rank = c.lora.alpha = args.rank
  c.data.batch_size = args.batch
  return c


def prepare(args, config, pipe, reward, dev):
  """(compiled step, state, frozen, batch, key, compile info) of `config` on device `dev`."""
  step = train_step.build(pipe, reward, config)
  frozen = dict(pipe.params, reward=reward.params, objective=step.objective)
  if args.dtype == "bfloat16":  # the UNet and VAE stored in bf16, as pipeline.load does
    frozen.update({k: jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), frozen[k])
                   for k in ("unet", "vae")})
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=[dev])
  repl = sharding.replicated(mesh)
  frozen = jax.device_put(frozen, repl)
  h, w, c = pipe.latent_shape
  size = pipe.image_size
  key = jax.random.split(jax.random.key(1), 5)
  batch = {"ids": jnp.asarray(pipe.tokenize(["a photo of a cat"] * args.batch)),
           "neg_ids": jnp.asarray(pipe.tokenize([""] * args.batch)),
           "x_T": jax.random.normal(key[0], (args.batch, h, w, c)),
           "reference": jax.random.uniform(key[1], (args.batch, size, size, 3)),
           "mask": (jax.random.uniform(key[2], (args.batch, size, size)) > 0.8).astype(
               jnp.float32)}
  batch = jax.device_put(batch, repl)
  state = jax.device_put(step.init_state(key[3], frozen["unet"]), repl)
  jax.block_until_ready((frozen, batch, state))
  spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), batch)
  run, info = step_program.compile_step(
      step, mesh, tuple(sharding.DEFAULT_RULES), online_reference=False, state=state,
      state_shardings=jax.tree.map(lambda _: repl, state), frozen=frozen,
      frozen_shardings=jax.tree.map(lambda _: repl, frozen), batch_spec=spec, rng=key[4])
  return run, state, frozen, batch, key, info


def sweep_benchmark(args, row, pipe, reward, dev) -> None:
  """A sweep of --sweep settings against as many separate steps, in one process: each timed
  round runs the sweep's step once and the single step --sweep times, interleaved."""
  n = args.sweep
  config = config_for(args)
  config.sweep.beta = tuple(0.01 * (i + 1) for i in range(n))
  swept = prepare(args, config, pipe, reward, dev)
  single = prepare(args, config_for(args), pipe, reward, dev)
  emit(dict(row, stage="compile", members=n, sweep_s=round(swept[5]["seconds"], 2),
            single_s=round(single[5]["seconds"], 2)), args.json)
  states = [swept[1], single[1]]
  for i in range(args.iters + 1):  # the first round warms up (not counted)
    times = []
    for j, (run, _, frozen, batch, key, _) in enumerate((swept, single)):
      tic = time.perf_counter()
      for _ in range(1 if j == 0 else n):
        states[j], metrics = run(states[j], frozen, batch, jax.random.fold_in(key[4], i))
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - tic)
    if i:
      emit(dict(row, stage="sweep_vs_separate", members=n, round=i,
                sweep_step_s=round(times[0], 4), separate_steps_s=round(times[1], 4),
                sweep_images_per_s=round(n * args.batch / times[0], 3),
                separate_images_per_s=round(n * args.batch / times[1], 3),
                saving=round(1 - times[0] / times[1], 3)), args.json)


def main(argv=None):
  args = parse_args(argv)
  if args.loop:
    return loop_benchmark(args.loop)
  dev = jax.devices()[0]
  row = {"bench": "step", "backend": jax.default_backend(), "device": dev.device_kind,
         "jax": jax.__version__, "model": args.model, "images": args.batch,
         "steps": args.steps, "K": args.grad_steps, "rank": args.rank, "cfg": args.guidance,
         "dtype": args.dtype, "attention": args.attention}
  tic = time.perf_counter()
  pipe = random_models.random_pipeline(0, attention_impl=args.attention, dtype=args.dtype,
                                       unet_remat=True, vae_remat=True, **MODELS[args.model])
  reward = registry.build(config_for(args).reward)
  if args.sweep:
    return sweep_benchmark(args, row, pipe, reward, dev)
  run, state, frozen, batch, key, info = prepare(args, config_for(args), pipe, reward, dev)
  emit(dict(row, stage="build", s=round(time.perf_counter() - tic - info["seconds"], 2)),
       args.json)
  emit(dict(row, stage="compile", s=round(info["seconds"], 2),
            lower_s=round(info["lower_seconds"], 2), cache=info["cache"]), args.json)

  tic = time.perf_counter()
  state, metrics = run(state, frozen, batch, key[4])
  jax.block_until_ready(metrics)
  emit(dict(row, stage="first_step", s=round(time.perf_counter() - tic, 2),
            loss=float(metrics["loss"])), args.json)
  times = []
  for i in range(args.iters):
    tic = time.perf_counter()
    state, metrics = run(state, frozen, batch, jax.random.fold_in(key[4], i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - tic)
  t = float(np.median(times))
  stats = dev.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  emit(dict(row, stage="steps", iters=args.iters, step_s=round(t, 4),
            images_per_s=round(args.batch / t, 3),
            peak_gib=None if peak is None else round(peak / 2**30, 2),
            nonfinite=float(metrics["nonfinite"])), args.json)


if __name__ == "__main__":
  main()
