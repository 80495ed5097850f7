"""Benchmark of the Flax UNet: jitted forward and forward+backward, FLOPs and matmul-rate share.

  python benchmarks/unet.py --config tiny|sd15 --batch 1 --dtype float32|bfloat16 \
      --attention xla|cudnn|auto --iters 10

Random weights and random non-zero inputs. Times are medians of --iters runs after warm-up,
each ended by jax.block_until_ready. FLOPs come from XLA's cost analysis of the compiled
program; on GPU that analysis does not see custom calls (cuDNN attention, cuBLAS fusions), so
GPU FLOPs are a lower bound: use the CPU figure. On the CPU backend the same computation is
also run in PyTorch eager (diffusers' UNet, same config and weights) for a time ratio.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from results import emit  # noqa: E402  (benchmarks/results.py)
from fnf_jax.diffusion import random_models  # noqa: E402
from fnf_jax.models import convert  # noqa: E402
from fnf_jax.models import unet  # noqa: E402

CONFIGS = {
    # SD1-shaped, two blocks: what the tests and :runlocal configs use.
    "tiny": dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                 norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # runwayml/stable-diffusion-v1-5 unet/config.json.
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--attention", choices=("auto", "xla", "chunked", "cudnn", "splash"),
                 default="auto")
  p.add_argument("--passes", default="forward,forward+backward",
                 help="comma-separated: forward, forward+backward (each measured and reported "
                 "before the next is compiled)")
  p.add_argument("--json", default=None, help="also append one JSON line per pass here")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--size", type=int, default=None, help="latent side (default: sample_size)")
  p.add_argument("--context_length", type=int, default=77)
  p.add_argument("--torch", choices=("auto", "yes", "no"), default="auto",
                 help="PyTorch eager comparison (auto: on the CPU backend only)")
  p.add_argument("--matmul_size", type=int, default=None,
                 help="side of the square matmul that measures the peak (default: 2048 CPU, 8192 GPU)")
  return p.parse_args(argv)


def median_time(fn, *args, iters: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(iters, 10)):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def flops_of(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def matmul_rate(dtype, n: int, iters: int) -> tuple[float, float]:
  """(seconds, FLOP/s) of an n x n x n matmul in `dtype`: the backend's practical peak."""
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), dtype)
  t = median_time(jax.jit(jnp.matmul), a, b, iters=iters)
  return t, 2 * n ** 3 / t


def torch_reference(config: dict, seed: int = 0):
  """diffusers' UNet with random, perturbed (nothing zero) weights, and its numpy state dict."""
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * (0.5 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.1))
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, state


def main(argv=None):
  args = parse_args(argv)
  backend = jax.default_backend()
  config_dict = CONFIGS[args.config]
  cfg = unet.UNetConfig.from_dict(config_dict)
  dtype = jnp.dtype(args.dtype)
  module = unet.UNet2DConditionModel(cfg, dtype=dtype, attention_impl=args.attention)
  size = args.size or cfg.sample_size
  use_torch = args.torch == "yes" or (args.torch == "auto" and backend == "cpu")
  print(f"backend {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"config {args.config}, batch {args.batch}, latent {size}x{size}, dtype {args.dtype}, "
        f"attention {args.attention}, matmul precision "
        f"{jax.config.jax_default_matmul_precision or 'default'}")

  start = time.perf_counter()
  abstract = convert.abstract_params(module, *unet.dummy_inputs(cfg))
  if use_torch:
    torch_model, state = torch_reference(config_dict)
    params = convert.to_params(state, abstract, where="diffusers (random)")
  else:
    params = random_models.init_params(abstract, seed=0)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"params {n_params / 1e6:.2f} M, built in {time.perf_counter() - start:.1f} s")

  k = jax.random.split(jax.random.key(3), 3)
  sample = jax.random.normal(k[0], (args.batch, size, size, cfg.in_channels), jnp.float32)
  timesteps = jax.random.randint(k[1], (args.batch,), 1, 1000).astype(jnp.float32)
  context = jax.random.normal(k[2], (args.batch, args.context_length, cfg.cross_attention_dims[0]),
                              jnp.float32)
  inputs = (sample, timesteps, context)

  def forward(p, x, t, c):
    return module.apply({"params": p}, x, t, c)

  def loss(p, x, t, c):
    return jnp.mean(jnp.square(forward(p, x, t, c).astype(jnp.float32)))

  results = {}
  passes = {"forward": forward, "forward+backward": jax.value_and_grad(loss)}
  for name in args.passes.split(","):
    start = time.perf_counter()
    compiled = jax.jit(passes[name]).lower(params, *inputs).compile()
    compile_s = time.perf_counter() - start
    t = median_time(compiled, params, *inputs, iters=args.iters)
    results[name] = (t, flops_of(compiled), compile_s)
    emit({"bench": "unet", "pass": name, "config": args.config, "batch": args.batch,
          "dtype": args.dtype, "attention": args.attention, "device": jax.devices()[0].device_kind,
          "compile_s": round(compile_s, 2), "ms": round(t * 1e3, 3)}, args.json)

  n = args.matmul_size or (2048 if backend == "cpu" else 8192)
  mm_t, mm_rate = matmul_rate(dtype, n, args.iters)
  print(f"matmul {n}x{n}x{n} {args.dtype}: {mm_t * 1e3:.2f} ms, {mm_rate / 1e12:.3f} TFLOP/s "
        "(the reference rate below)")
  note = "" if backend == "cpu" else "  [GPU cost analysis misses custom calls: FLOPs are a lower bound]"
  for name, (t, flops, compile_s) in results.items():
    line = f"{name:17s} {t * 1e3:9.2f} ms  (compile {compile_s:.1f} s)"
    if flops:
      rate = flops / t
      line += (f"  {flops / 1e9:9.2f} GFLOP  {rate / 1e12:.3f} TFLOP/s  "
               f"{100 * rate / mm_rate:.1f}% of matmul rate")
    print(line + note)

  if use_torch:
    import torch  # pylint: disable=g-import-not-at-top

    if dtype == jnp.bfloat16:
      torch_model = torch_model.to(torch.bfloat16)
    tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    x = torch.from_numpy(np.asarray(sample).transpose(0, 3, 1, 2).copy()).to(tdt)
    tt = torch.from_numpy(np.array(timesteps))
    c = torch.from_numpy(np.array(context)).to(tdt)

    def torch_forward():
      with torch.no_grad():
        return torch_model(x, tt, c).sample

    def torch_forward_backward():
      torch_model.zero_grad(set_to_none=True)
      out = torch_model(x, tt, c).sample
      value = out.float().square().mean()
      value.backward()
      return value

    ref = torch_forward().float().numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(jax.jit(forward)(params, *inputs), np.float32)
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f"PyTorch eager (torch {torch.__version__}); outputs agree to rel err {err:.1e}")
    # OpenMP threads that spin on a busy (shared) machine can slow PyTorch down many times:
    # time its default thread count and one thread, and compare against the faster.
    thread_counts = sorted({torch.get_num_threads(), 1}, reverse=True)
    for name, fn in (("forward", torch_forward), ("forward+backward", torch_forward_backward)):
      if name not in results:
        continue
      best = None
      for threads in thread_counts:
        torch.set_num_threads(threads)
        for _ in range(2):
          fn()
        times = []
        for _ in range(max(args.iters, 10)):
          start = time.perf_counter()
          fn()
          times.append(time.perf_counter() - start)
        t = statistics.median(times)
        print(f"{name:17s} torch {t * 1e3:9.2f} ms  ({threads} thread{'s' * (threads > 1)})")
        best = t if best is None else min(best, t)
      print(f"{name:17s} JAX/PyTorch time ratio {results[name][0] / best:.2f} "
            "(against PyTorch's faster thread count)")
      torch.set_num_threads(thread_counts[0])


if __name__ == "__main__":
  main()
