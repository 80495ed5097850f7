"""Compile time of the Focus-N-Fix step at SD1.5 scale, piece by piece, ahead of time from
abstract parameters (no weights: it runs on a laptop CPU).

  python benchmarks/compile_time.py                       # every piece, then the whole step
  python benchmarks/compile_time.py --pieces step --cache_dir /tmp/jc   # twice: the hit time

The setting is the device check's: SD1.5 at 512², 50 DDIM steps with CFG 7.5, K = 2, LoRA
r = 64, the cached reference, bfloat16, the Q16-shaped reward (CLIP ViT-L/14 image tower), the
configs' memory settings (attention `auto`, UNet and VAE block remat). Pieces (step_pieces.py):

  reference    the frozen model's sampler, decode and mask: Î0 and M (the cache job's program)
  forward      all S sampling steps of the LoRA model, no gradient (one scan)
  image_grads  decode, reward, constraint and their gradient w.r.t. x_0
  lora_grads   back through the K gradient steps, one VJP per step
  update       the optimizer and the non-finite guard
  step         the train step as the training loop compiles it (step_program.compile_step:
               each piece compiled on a thread while the next is traced); wall time
  one_program  `jax.jit(step.train_step)`: the same step as one program

Each piece is traced and lowered (`lower_s`) and compiled by XLA (`compile_s`), timed apart.
One JSON line per piece goes to stdout (and to --out) as soon as it is measured. With
--cache_dir the persistent compilation cache is on, and the line says whether it was a hit.
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
import ml_collections  # noqa: E402

import memory  # noqa: E402  (benchmarks/memory.py: the abstract SD1.5 setting)
from fnf_jax.runtime import compilation  # noqa: E402
from fnf_jax.runtime import sharding  # noqa: E402
from fnf_jax.fnf import step_program  # noqa: E402

PIECES = ("reference", "forward", "image_grads", "lora_grads", "update", "step", "one_program")


def setting(args):
  """(step, frozen, state, batch) of the SD1.5 setting, all abstract."""
  pipe, _, _, step, frozen, state = memory._setup(  # pylint: disable=protected-access
      args.model, args.images, args.grad_steps, True, "nothing_saveable", args.attention, True)
  return step, frozen, state, memory._batch(pipe, args.images)  # pylint: disable=protected-access


def _spec(tree, mesh):
  repl = sharding.replicated(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), tree)


def program(args, name: str):
  """(jitted, abstract args) of one piece, as compile_step lowers it. Only the pieces before it
  are traced here (by eval_shape, for its inputs): tracing it would fill the jit cache that its
  lowering then reads, and hide its tracing time."""
  step, frozen, state, batch = setting(args)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  p = step.pieces
  if name == "reference":
    inputs = {k: v for k, v in batch.items() if k not in ("reference", "mask")}
    return jax.jit(step.reference), (frozen, inputs)
  if name == "forward":
    return jax.jit(p.forward), (state.lora, frozen, batch, rng)
  if name == "one_program":
    return jax.jit(step.train_step, donate_argnums=0), (state, frozen, batch, rng)
  sampled = jax.eval_shape(p.forward, state.lora, frozen, batch, rng)
  ref = (batch["reference"], batch["mask"])
  if name == "image_grads":
    return jax.jit(p.image_grads), (frozen, batch, sampled.x0, *ref)
  image = jax.eval_shape(p.image_grads, frozen, batch, sampled.x0, *ref)
  if name == "lora_grads":
    return jax.jit(p.lora_grads), (state.lora, frozen, batch, sampled, image[1], ref[1])
  grads = jax.eval_shape(p.lora_grads, state.lora, frozen, batch, sampled, image[1], ref[1])
  return jax.jit(p.update, donate_argnums=0), (state, frozen["objective"], grads[0], image[0],
                                               grads[1])


def whole_step(args) -> dict:
  """The step as the training loop compiles it, on one device."""
  step, frozen, state, batch = setting(args)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
  repl = sharding.replicated(mesh)
  batch_spec = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), batch)
  _, info = step_program.compile_step(
      step, mesh, tuple(sharding.DEFAULT_RULES), online_reference=False, state=state,
      state_shardings=jax.tree.map(lambda _: repl, state), frozen=frozen,
      frozen_shardings=jax.tree.map(lambda _: repl, frozen), batch_spec=batch_spec,
      rng=jax.random.key(0))
  return {"lower_s": round(info["lower_seconds"], 2),
          "compile_s": round(info["seconds"] - info["lower_seconds"], 2),
          "total_s": round(info["seconds"], 2), "cache": info["cache"]}


def measure(name: str, args) -> dict:
  row = {"piece": name, "model": args.model, "images": args.images, "steps": 50,
         "K": args.grad_steps, "attention": args.attention, "backend": jax.default_backend(),
         "jax": jax.__version__}
  if name == "step":
    return {**row, **whole_step(args)}
  fn, inputs = program(args, name)
  before = compilation.cache_counts()
  tic = time.perf_counter()
  lowered = fn.lower(*inputs)
  lower_s = time.perf_counter() - tic
  tic = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - tic
  row.update(lower_s=round(lower_s, 2), compile_s=round(compile_s, 2),
             total_s=round(lower_s + compile_s, 2))
  row["cache"] = compilation.cache_outcome(before)
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pieces", default=",".join(PIECES), help=f"comma-separated of {PIECES}")
  p.add_argument("--model", default="sd15", choices=sorted(memory.MODELS))
  p.add_argument("--images", type=int, default=4)
  p.add_argument("--grad_steps", type=int, default=2)
  p.add_argument("--attention", default="auto")
  p.add_argument("--cache_dir", default="", help="persistent compilation cache folder")
  p.add_argument("--out", default="", help="also append the JSON lines to this file")
  args = p.parse_args(argv)
  cfg = ml_collections.ConfigDict({"cache_dir": args.cache_dir, "min_compile_secs": 0.0,
                                   "xla_flags": ""})
  compilation.setup(cfg, "/tmp/unused")
  for name in args.pieces.split(","):
    row = json.dumps(measure(name, args))
    print(row, flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(row + "\n")


if __name__ == "__main__":
  main()
