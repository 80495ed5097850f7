"""Memory and FLOPs of the full Focus-N-Fix step at real scale, compiled ahead of time from
abstract parameters (no weights, no device memory: it runs on a laptop CPU).

  python benchmarks/memory.py --model sd15 --images 1 --grad_steps 2 --vae_remat 1
  python benchmarks/memory.py --table    # the BENCHMARKS.md table (2-core CPU: about 2 hours)
  python benchmarks/memory.py --sweep 1,2,4,8   # a sweep of 1..8 settings, --images per member

The step is the real `train_step.build` one: SD1.5 at 512² (or SDXL at 1024²), 50 DDIM steps
with CFG 7.5, DRaFT-K, LoRA r = 64 on the attention projections, the cached reference, bfloat16
weights and compute, and the Q16-shaped reward (CLIP ViT-L/14 image tower, rematerialised, and
Q16's two-prompt head). Per setting it prints XLA's memory analysis of the compiled program
(arguments, outputs, temporaries, per device) and the FLOPs per image.

Memory settings (the real configs' defaults): attention "chunked" (XLA over query chunks,
each rematerialised), the UNet's and the VAE decoder's blocks rematerialised in the backward
pass (model.unet_remat, model.vae_remat), the gradient steps' remat policy nothing_saveable.

FLOPs. XLA's cost analysis counts a loop body once, not once per iteration, and the step has
loops (the S − K sampling steps, the K gradient steps and their transpose, the attention's
query chunks). So the FLOPs are counted from pieces compiled on their own with XLA attention
(the same arithmetic as the chunked one, without its loop) and the step's remat settings:
    (S − K) · one guided UNet call  +  K · its value-and-grad (remat included)
    + the tail: VAE decode, reward and their gradient (VAE remat included)
(the prompt encoding, the loss and the optimizer, below 0.1 %, are left out). The analytic
budget, from the forward FLOPs of the project's planning (SD1.5 UNet at 64² 787 GFLOP, SDXL's
at 128² 6,749; SD VAE decoder to 512² 2,504, four times that to 1024²; CLIP ViT-L/14 image
tower 162), counts a backward as twice its forward: S · 2 · U + K · 2 · 2 · U + 3 · D + 3 · R
per image, with CFG's two UNet passes; SD1.5, K = 1: 89.8 TFLOP (the planning's ≈ 90).
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import focus_n_fix  # noqa: E402  (configs/)
from fnf_jax.fnf import method  # noqa: E402
from fnf_jax.diffusion import random_models  # noqa: E402
from fnf_jax.diffusion import sampling  # noqa: E402
from fnf_jax.fnf import train_step  # noqa: E402
from fnf_jax.models import clip as clip_lib  # noqa: E402
from fnf_jax.models import lora as lora_lib  # noqa: E402
from fnf_jax.rewards import clip_base  # noqa: E402
from fnf_jax.rewards import q16  # noqa: E402

MODELS = {
    "sd15": dict(unet=random_models.SD15_UNET, vae=random_models.SD15_VAE,
                 text=random_models.SD15_TEXT),
    "sdxl": dict(unet=random_models.SDXL_UNET, vae=random_models.SDXL_VAE,
                 text=random_models.SDXL_TEXT, text_2=random_models.SDXL_TEXT_2),
}
# Forward GFLOP at batch 1 (see the docstring): UNet, VAE decoder, reward image tower.
FORWARD_GFLOP = {"sd15": (787.0, 2504.0, 162.0), "sdxl": (6749.0, 4 * 2504.0, 162.0)}
GIB = 2**30


def budget_tflop(model: str, steps: int, k: int) -> float:
  unet, decoder, reward = FORWARD_GFLOP[model]
  return (steps * 2 * unet + k * 2 * 2 * unet + 3 * decoder + 3 * reward) / 1e3


def _abstract(tree, dtype=None):
  def one(x):
    x = nn.meta.unbox(x)
    return jax.ShapeDtypeStruct(x.shape, dtype if dtype is not None else x.dtype)
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def q16_reward(dtype):
  """The Q16 reward's computation on an abstract CLIP ViT-L/14 (no weights)."""
  cfg = focus_n_fix.clip_reward("q16")
  module = clip_lib.CLIPModel(clip_lib.VIT_L_14, dtype=jnp.dtype(dtype), remat=cfg.remat)
  size = clip_lib.VIT_L_14.vision_config.image_size
  abstract = nn.meta.unbox(jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, size, size, 3))))["params"])
  clip = clip_lib.Clip(module=module, params=abstract)

  def target(params, embeds, ids):
    del ids
    cos = q16._cosines(params, embeds)  # pylint: disable=protected-access
    return q16.SCALE * (cos[:, 1] - cos[:, 0])

  score = lambda params, embeds, ids: jax.nn.sigmoid(-target(params, embeds, ids))
  head = {"prompts": jax.ShapeDtypeStruct((2, 768), jnp.float32)}
  return clip_base.make_reward(cfg, clip, head, score, target)


def config_for(images: int, grad_steps: int, vae_remat: bool, remat_policy: str,
               members: int = 0):
  """`members` > 0: a sweep of that many β values (one LoRA each, configs/focus_n_fix.py)."""
  c = focus_n_fix.base_config()
  c.sweep.beta = tuple(0.01 * (i + 1) for i in range(members))
  c.data.batch_size = images
  c.sampling.num_steps, c.sampling.guidance_scale = 50, 7.5
  c.train.grad_steps, c.train.reference, c.train.remat_policy = grad_steps, "cache", remat_policy
  c.lora.rank, c.lora.alpha = 64, 64.0
  c.model.vae_remat = vae_remat
  c.reward = focus_n_fix.clip_reward("q16")
  return c


def _setup(model: str, images: int, grad_steps: int, vae_remat: bool, remat_policy: str,
           attention: str, unet_remat: bool, members: int = 0):
  """(pipe, config, step, abstract frozen params, abstract state) of one setting."""
  pipe = random_models.random_pipeline(0, dtype="bfloat16", attention_impl=attention,
                                       unet_remat=unet_remat, vae_remat=vae_remat,
                                       weights=False, **MODELS[model])
  reward = q16_reward("bfloat16")
  config = config_for(images, grad_steps, vae_remat, remat_policy, members)
  step = train_step.build(pipe, reward, config)
  abstract = pipe.abstract_params()
  frozen = {name: _abstract(abstract[name], jnp.bfloat16 if name in ("unet", "vae") else None)
            for name in abstract}
  frozen["reward"] = _abstract(reward.params)
  frozen["objective"] = jax.eval_shape(lambda: step.objective)
  state = jax.eval_shape(step.init_state, jax.random.key(0), frozen["unet"])
  return pipe, reward, config, step, frozen, state


def _batch(pipe, images: int) -> dict:
  h, w, ch = pipe.latent_shape
  size, encoders = pipe.image_size, len(pipe.text_encoders)
  return {"ids": jax.ShapeDtypeStruct((encoders, images, 77), jnp.int32),
          "neg_ids": jax.ShapeDtypeStruct((encoders, images, 77), jnp.int32),
          "x_T": jax.ShapeDtypeStruct((images, h, w, ch), jnp.float32),
          "reference": jax.ShapeDtypeStruct((images, size, size, 3), jnp.float32),
          "mask": jax.ShapeDtypeStruct((images, size, size), jnp.float32)}


@functools.lru_cache(maxsize=None)
def _pieces(model: str, images: int, remat_policy: str, unet_remat: bool,
            vae_remat: bool) -> tuple[float, float, float]:
  """FLOPs of one guided UNet call, of its value-and-grad, and of the tail (decode + reward
  and their gradient), each compiled alone with XLA attention (see the docstring)."""
  pipe, reward, config, _, frozen, state = _setup(model, images, 1, vae_remat, remat_policy,
                                                  "xla", unet_remat)
  s = train_step.Sampler.from_config(config, pipe)
  batch = _batch(pipe, images)
  cond = jax.eval_shape(lambda f, b: method.conditioning(pipe, s, f, b), frozen, batch)
  x, t = batch["x_T"], jax.ShapeDtypeStruct((), jnp.int32)

  def plain(unet, cond, lora, x, t):
    return method.denoiser(pipe, s, unet, cond, lora=lora_lib.collection(lora, 1.0))(x, t)

  def with_grad(unet, cond, lora, x, t):
    body = jax.checkpoint(lambda lo, xx: plain(unet, cond, lo, xx, t),
                          policy=sampling.REMAT_POLICIES[remat_policy])
    return jax.grad(lambda lo, xx: jnp.sum(body(lo, xx).astype(jnp.float32)),
                    argnums=(0, 1))(lora, x)

  def tail(vae, reward_params, x0):
    # The Q16 head reads no prompt.
    return jax.grad(lambda z: jnp.sum(reward.score(reward_params, pipe.decode(vae, z), None)))(x0)

  return (_flops(jax.jit(plain).lower(frozen["unet"], cond, state.lora, x, t).compile()),
          _flops(jax.jit(with_grad).lower(frozen["unet"], cond, state.lora, x, t).compile()),
          _flops(jax.jit(tail).lower(frozen["vae"], frozen["reward"], x).compile()))


def step_flops(model: str, images: int, grad_steps: int, vae_remat: bool, remat_policy: str,
               unet_remat: bool, steps: int = 50) -> float:
  """FLOPs of one training step, from its pieces compiled alone."""
  plain, grad, tail = _pieces(model, images, remat_policy, unet_remat, vae_remat)
  return (steps - grad_steps) * plain + grad_steps * grad + tail


def measure(model: str, images: int, grad_steps: int, vae_remat: bool,
            remat_policy: str = "nothing_saveable", attention: str = "chunked",
            unet_remat: bool = True) -> dict:
  """The compiled step's memory analysis, and its FLOPs per image."""
  pipe, _, _, step, frozen, state = _setup(model, images, grad_steps, vae_remat, remat_policy,
                                           attention, unet_remat)
  tic = time.perf_counter()
  compiled = jax.jit(step.train_step, donate_argnums=0).lower(
      state, frozen, _batch(pipe, images), jax.random.key(0)).compile()
  seconds = time.perf_counter() - tic
  mem = compiled.memory_analysis()
  flops = step_flops(model, images, grad_steps, vae_remat, remat_policy, unet_remat)
  return {"model": model, "images": images, "K": grad_steps, "vae_remat": vae_remat,
          "remat_policy": remat_policy, "arguments": mem.argument_size_in_bytes / GIB,
          "outputs": mem.output_size_in_bytes / GIB, "temporaries": mem.temp_size_in_bytes / GIB,
          "tflop_per_image": flops / images / 1e12,
          "budget": budget_tflop(model, 50, grad_steps), "compile_s": seconds}


def measure_sweep(model: str, members: int, images: int = 1, grad_steps: int = 2) -> dict:
  """The compiled step of a sweep of `members` settings (fnf_jax/fnf/sweep.py), `images` per
  member: its memory analysis (the real configs' memory settings)."""
  pipe, _, _, step, frozen, state = _setup(model, images, grad_steps, True, "nothing_saveable",
                                           "chunked", True, members)
  tic = time.perf_counter()
  compiled = jax.jit(step.train_step, donate_argnums=0).lower(
      state, frozen, _batch(pipe, images), jax.random.key(0)).compile()
  seconds = time.perf_counter() - tic
  mem = compiled.memory_analysis()
  return {"model": model, "members": members, "images": images, "K": grad_steps,
          "arguments": mem.argument_size_in_bytes / GIB,
          "outputs": mem.output_size_in_bytes / GIB,
          "temporaries": mem.temp_size_in_bytes / GIB, "compile_s": seconds}


SWEEP_HEADER = ("| model | members | images / member | K | arguments GiB | outputs GiB | "
                "temporaries GiB | arguments + temporaries GiB | per member GiB | compile |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


def sweep_row(r: dict) -> str:
  fits = r["arguments"] + r["temporaries"]
  return (f"| {r['model']} | {r['members']} | {r['images']} | {r['K']} | {r['arguments']:.2f} | "
          f"{r['outputs']:.2f} | {r['temporaries']:.2f} | {fits:.2f} | "
          f"{fits / r['members']:.2f} | {r['compile_s']:.0f} s |")


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def row(r: dict) -> str:
  ratio = f"{r['tflop_per_image'] / r['budget']:.2f}×"
  fits = r["arguments"] + r["temporaries"]
  return (f"| {r['model']} | {r['images']} | {r['K']} | {'on' if r['vae_remat'] else 'off'} | "
          f"{r['remat_policy']} | {r['arguments']:.2f} | {r['outputs']:.2f} | "
          f"{r['temporaries']:.2f} | {fits:.2f} | {r['tflop_per_image']:.1f} | {r['budget']:.1f} | "
          f"{ratio} | "
          f"{r['compile_s']:.0f} s |")


HEADER = ("| model | images / device | K | VAE remat | remat policy | arguments GiB | outputs GiB "
          "| temporaries GiB | arguments + temporaries GiB | TFLOP / image | budget | of budget | "
          "compile |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=sorted(MODELS), default="sd15")
  p.add_argument("--images", type=int, default=1)
  p.add_argument("--grad_steps", type=int, default=2)
  p.add_argument("--vae_remat", type=int, choices=(0, 1), default=1)
  p.add_argument("--remat_policy", default="nothing_saveable",
                 choices=sorted(sampling.REMAT_POLICIES))
  p.add_argument("--table", action="store_true", help="every setting of BENCHMARKS.md")
  p.add_argument("--sweep", default="", help="comma-separated member counts, e.g. 1,2,4,8: "
                 "the step of a sweep of that many settings, --images per member")
  args = p.parse_args(argv)
  print(f"backend {jax.default_backend()}, jax {jax.__version__}; compiled from abstract "
        "params (XLA:CPU memory analysis when run on the CPU)", flush=True)
  if args.sweep:
    print(SWEEP_HEADER, flush=True)
    for n in map(int, args.sweep.split(",")):
      print(sweep_row(measure_sweep(args.model, n, args.images, args.grad_steps)), flush=True)
    return
  print(HEADER, flush=True)
  if not args.table:
    print(row(measure(args.model, args.images, args.grad_steps, bool(args.vae_remat),
                      args.remat_policy)), flush=True)
    return
  # SD1.5: images per device x VAE remat x K; SDXL (a much longer compile): one image, K = 1, 2.
  settings = [("sd15", images, k, vae_remat) for k in (1, 2) for images in (1, 2, 4)
              for vae_remat in (False, True)] + [("sdxl", 1, k, True) for k in (1, 2)]
  for model, images, k, vae_remat in settings:
    print(row(measure(model, images, k, vae_remat)), flush=True)


if __name__ == "__main__":
  main()
