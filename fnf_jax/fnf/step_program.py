"""The train step as the training loop runs it: each piece of step_pieces jitted with explicit
shardings and compiled ahead of time on a thread while the next piece is traced
(compilation.Compiler), then run in order by the same `step_pieces.run` that defines the step.

The pieces hand each other small arrays (the final latents, the K gradient steps' inputs, the
prompts' conditioning, d loss / d x_0), sharded over the batch like the batch itself; the LoRA,
its gradient and the metrics are replicated. `update` donates the old state.
"""

import functools
import time

import jax
import numpy as np
from absl import logging

from fnf_jax.runtime import compilation
from fnf_jax.runtime import sharding
from fnf_jax.fnf import step_pieces


def _specs(tree, shardings):
  """Abstract values of `tree` with `shardings` (a prefix of it: one sharding may cover a
  subtree)."""
  return jax.tree.map(
      lambda s, sub: jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s,
                                         weak_type=getattr(a, "weak_type", False)), sub),
      shardings, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def compile_step(step, mesh, rules, *, online_reference: bool, state, state_shardings, frozen,
                 frozen_shardings, batch_spec: dict, rng) -> tuple:
  """(the compiled step: (state, frozen, batch, rng) -> (state, metrics), compile info).

  `state`, `frozen`: arrays or abstract values; `batch_spec`: ShapeDtypeStructs with their
  shardings; `rng`: the replicated step key (or its abstract value). Each piece is traced
  once: its outputs' shapes are read from the trace (their shardings are fixed by prefix
  trees, known before tracing), which the next piece is traced against."""
  tic = time.perf_counter()  # tracing is part of compiling
  p = step.pieces
  repl = sharding.replicated(mesh)
  on_batch = lambda axis: sharding.batch_sharding(mesh, axis + 1, rules, axis)
  b0, b1 = on_batch(0), on_batch(1)  # the batch on axis 0 (x_0) or 1 (xs [K, B, ...])
  # Per-member outputs (x_0, the kept inputs, d/dx_0, gradients, metrics): in a sweep they carry
  # the members' axis first; the reference and the key are shared.
  m0, m1, mrepl = (b0, b1, repl) if not step.members else (
      sharding.stacked(mesh, b0), sharding.stacked(mesh, b1), sharding.stacked(mesh))
  state_spec = _specs(state, state_shardings)
  frozen_spec = _specs(frozen, frozen_shardings)
  rng_spec = jax.ShapeDtypeStruct(np.shape(rng), rng.dtype, sharding=repl)
  lora_spec = state_spec.lora
  compiler = compilation.Compiler("the train step", since=tic)

  def trace(name, fn, out_shardings, *args, donate=()):
    traced = jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate).trace(*args)
    compiler.add(name, traced)  # compiles on a thread while the next piece is traced
    return _specs(traced.out_info, out_shardings)

  if online_reference:
    ref_spec = trace("reference", p.reference, b0, frozen_spec, batch_spec)
  else:
    ref_spec = p.reference(frozen_spec, batch_spec)  # the batch's cached Î0 and M
  sampled = trace("forward", p.forward, step_pieces.Sampled(x0=m0, xs=m1, cond=m0), lora_spec,
                  frozen_spec, batch_spec, rng_spec)
  metrics, g_x0 = trace("image_grads", p.image_grads, (mrepl, m0), frozen_spec, batch_spec,
                        sampled.x0, *ref_spec)
  grads, latent = trace("lora_grads", p.lora_grads, mrepl, lora_spec, frozen_spec, batch_spec,
                        sampled, g_x0, ref_spec[1])
  trace("update", p.update, (state_shardings, mrepl), state_spec, frozen_spec["objective"],
        grads, metrics, latent,
        donate=(0,))
  compiled, info = compiler.finish()
  for name, program in compiled.items():
    _log_memory(name, program)
  pieces = step_pieces.Pieces(
      reference=compiled.get("reference", p.reference), forward=compiled["forward"],
      image_grads=compiled["image_grads"], lora_grads=compiled["lora_grads"],
      update=compiled["update"])
  return functools.partial(step_pieces.run, pieces), info


def _log_memory(name: str, compiled) -> None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    mem = None
  if mem is None:
    return
  gib = lambda b: b / 2**30
  logging.info("train step piece %s, memory per device: arguments %.2f GiB, outputs %.2f GiB, "
               "temp %.2f GiB", name, gib(mem.argument_size_in_bytes),
               gib(mem.output_size_in_bytes), gib(mem.temp_size_in_bytes))
