"""Benchmark of the Focus-N-Fix training step: images/s, step time, matmul-rate share, memory.

  python benchmarks/train_step.py --model tiny|sd15 --batch 4 --steps 50 --grad_steps 2 \
      --rank 64 --reference cache|online|both --dtype bfloat16 --attention cudnn
  python benchmarks/train_step.py --loop 60     # the whole training loop, tiny models

--loop N runs the real loop (`train.fit`, configs/violence.py:runlocal with N steps) twice in
one process: synchronous (data.prefetch = 0, metrics fetched every step: the loop before it
overlapped) and overlapped (prefetch 2, metrics fetched every 10 steps), and prints the
images/s of each over the steps after compiling.

Random weights of the chosen shapes (no checkpoint needed), the real `train_step.build` step jitted
as the training loop jits it, random non-zero inputs, median of >= 10 steps after warm-up.
FLOPs come from XLA's cost analysis (trustworthy on the CPU only: on GPUs it misses cuDNN and
cuBLAS custom calls); the matmul rate is measured in the same run on the same device.
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

from unet import flops_of, matmul_rate, median_time  # noqa: E402  (benchmarks/unet.py)

from fnf_jax import random_models  # noqa: E402
from fnf_jax import train_step  # noqa: E402
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
  p.add_argument("--reference", choices=("cache", "online", "both"), default="both")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--attention", choices=("xla", "cudnn", "auto"), default="xla")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--matmul_size", type=int, default=None)
  p.add_argument("--loop", type=int, default=0, help="steps of the whole-loop comparison")
  return p.parse_args(argv)


def loop_benchmark(steps: int) -> None:
  import tempfile  # pylint: disable=g-import-not-at-top
  import violence  # pylint: disable=g-import-not-at-top  (configs/, on sys.path above)
  from fnf_jax import train  # pylint: disable=g-import-not-at-top

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


def config_for(args, reference: str):
  import focus_n_fix  # pylint: disable=g-import-not-at-top  (configs/, on sys.path above)

  c = focus_n_fix.base_config()
  c.sampling.num_steps, c.sampling.guidance_scale = args.steps, args.guidance
  c.train.grad_steps, c.train.reference = args.grad_steps, reference
  c.lora.rank = c.lora.alpha = args.rank
  return c


def main(argv=None):
  args = parse_args(argv)
  if args.loop:
    return loop_benchmark(args.loop)
  dev = jax.devices()[0]
  print(f"backend {jax.default_backend()} ({dev.device_kind}), jax {jax.__version__}, "
        f"model {args.model}, batch {args.batch}, {args.steps} DDIM steps, K={args.grad_steps}, "
        f"LoRA r={args.rank}, CFG {args.guidance}, dtype {args.dtype}, attention {args.attention}")
  tic = time.perf_counter()
  pipe = random_models.random_pipeline(0, attention_impl=args.attention, dtype=args.dtype,
                                       **MODELS[args.model])
  frozen = dict(pipe.params)
  if args.dtype == "bfloat16":  # frozen weights stored in bf16, as pipeline.load does
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
  print(f"built in {time.perf_counter() - tic:.1f} s")
  n = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
  _, peak = matmul_rate(jnp.dtype(args.dtype), n, args.iters)
  print(f"matmul {n}^3 {args.dtype}: {peak / 1e12:.3f} TFLOP/s (the reference rate)")

  h, w, c = pipe.latent_shape
  key = jax.random.split(jax.random.key(1), 4)
  batch = {"ids": jnp.asarray(pipe.tokenize(["a photo of a cat"] * args.batch)),
           "neg_ids": jnp.asarray(pipe.tokenize([""] * args.batch)),
           "x_T": jax.random.normal(key[0], (args.batch, h, w, c))}
  modes = ("cache", "online") if args.reference == "both" else (args.reference,)
  for mode in modes:
    config = config_for(args, mode)
    reward = registry.build(config.reward)
    step = train_step.build(pipe, reward, config)
    frozen["reward"] = reward.params
    state = step.init_state(key[1], frozen["unet"])
    b = dict(batch)
    if mode == "cache":
      b["reference"], b["mask"] = jax.jit(step.reference)(frozen, batch)
    fn = jax.jit(step.train_step)
    tic = time.perf_counter()
    compiled = fn.lower(state, frozen, b, key[2]).compile()
    compile_s = time.perf_counter() - tic
    flops = flops_of(compiled)
    mem = compiled.memory_analysis()
    t = median_time(lambda s: compiled(s, frozen, b, key[2])[1]["loss"], state, iters=args.iters)
    share = f"{flops / t / peak:6.1%}" if flops else "   n/a"
    tflops = f"{flops / t / 1e12:.3f}" if flops else "n/a"
    temp = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem else float("nan")
    peak_mem = dev.memory_stats().get("peak_bytes_in_use", 0) / 2**30 if dev.memory_stats() else float("nan")
    print(f"reference={mode:6s} step {t * 1e3:9.1f} ms  {args.batch / t:7.2f} images/s  "
          f"{tflops} TFLOP/s  {share} of matmul rate  compile {compile_s:.1f} s  "
          f"temp {temp:.2f} GiB  peak {peak_mem:.2f} GiB")


if __name__ == "__main__":
  main()
