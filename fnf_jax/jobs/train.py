"""The `train` job: fine-tunes a LoRA with Focus-N-Fix (or DRaFT) and writes WORKDIR/lora.safetensors.

In order: the resume check (before anything loads), the run lock, the run's pieces
(fnf_jax/fnf/run.py: mesh, models, reward, examples, step), the reference cache (computed
first when it is missing), the examples to train on, the state (restored from the newest
checkpoint that restores), the step's programs compiled together, then the shared training
loop (fnf_jax/runtime/loop.py) and, at the end, the LoRA file.
"""

import os

import flax.linen as nn
import jax
from absl import logging

from fnf_jax.config import sweep as config_sweep
from fnf_jax.data import batch as batch_lib
from fnf_jax.data import examples as examples_lib
from fnf_jax.fnf import reference_cache
from fnf_jax.fnf import run as run_lib
from fnf_jax.fnf import step_program
from fnf_jax.fnf import sweep
from fnf_jax.jobs import cache as cache_job
from fnf_jax.runtime import checkpoint
from fnf_jax.runtime import distributed
from fnf_jax.runtime import log as log_lib
from fnf_jax.runtime import loop as loop_lib
from fnf_jax.runtime import optimizer as optimizer_lib
from fnf_jax.runtime import resume
from fnf_jax.runtime import sharding


def train(config, workdir: str) -> dict:
  """The `train` job. Returns the last logged metrics (host floats)."""
  return fit(config, workdir)[0]


def fit(config, workdir: str, run: run_lib.Run | None = None) -> tuple[dict, dict]:
  """Trains (or resumes) the run in `workdir`: (last logged metrics, final LoRA params on host).

  `run`: the Run of `config` from `fnf.run.setup`, when the caller has one.
  """
  # A resume whose settings differ where a checkpoint cannot follow fails here, before
  # anything loads; a bad config or cluster fails in setup, before the workdir exists.
  changes = resume.check_resume(config, workdir)
  with cache_job.workdir_held(config, workdir, run):
    return _fit(config, workdir, run or run_lib.setup(config), changes)


def _reference(config, workdir: str, run: run_lib.Run):
  """The reference cache of the run (computed first in a fresh workdir), or None (online)."""
  if config.train.reference != "cache":
    return None
  if not reference_cache.is_complete(workdir):
    # A fresh workdir: compute the cache first (every process), so one command trains.
    logging.info("no reference cache in %s yet: computing it first", workdir)
    cache_job.compute(config, workdir, run)
  return reference_cache.Cache(workdir, config, run.examples)


def _fit(config, workdir: str, run: run_lib.Run, changes: dict) -> tuple[dict, dict]:
  t, mesh = config.train, run.mesh
  cached = _reference(config, workdir, run)
  examples = run_lib.select_examples(config, run.examples, cached)
  feed = examples_lib.Feed(examples, config.data.batch_size, config.seed)
  repl = sharding.replicated(mesh)
  # The step keys' root as a global array (every process saves its part of the checkpoint).
  rng = jax.jit(lambda: run_lib.step_keys(config.seed)[1], out_shardings=repl)()

  # The mesh context and rules make the modules' nn.with_logical_constraint calls take effect.
  with mesh, nn.logical_axis_rules(run.rules):
    state, rng, state_shardings, start = _start(config, workdir, run, changes, rng)
    if start.step >= t.num_steps:
      start.checkpointer.close()
      logging.info("the run in %s is finished (step %d of %d): nothing to train", workdir,
                   start.step, t.num_steps)
      return _finish(config, workdir, state, start.step)

    batch_size = config.data.batch_size
    rows = batch_lib.local_rows(batch_size, mesh, run.rules)
    make_host = lambda p: batch_lib.host_rows(run.pipe, feed.batch_at(p), config, rows, cached,
                                              run.reward)
    host = make_host(0)
    b_shardings = batch_lib.batch_shardings(host, mesh, run.rules)
    # The step's pieces, compiled together ahead of the first step (step_program.py); the log
    # says how long and whether the persistent cache served them.
    compiled, _ = step_program.compile_step(
        run.step, mesh, run.rules, online_reference=t.reference == "online", state=state,
        state_shardings=state_shardings, frozen=run.frozen,
        frozen_shardings=run.frozen_shardings,
        batch_spec=batch_lib.global_spec(host, b_shardings, batch_size), rng=rng)

    def step_fn(state, host, step):
      batch = batch_lib.to_global(host, b_shardings, batch_size)
      state, metrics = compiled(state, run.frozen, batch, jax.random.fold_in(rng, step))
      return state, metrics, batch

    def meta(step):
      position = step * batch_size
      return {"step": step, "position": position, "epoch": position // len(examples)}

    panels = None
    if config.log.image_every:
      panels = lambda writer, state, batch, step: _panels(run, writer, state, batch, step)
    loop = loop_lib.Loop(
        # The rate counts every member's images (a sweep trains N LoRAs on each batch).
        workdir=workdir, num_steps=t.num_steps,
        batch_size=batch_size * max(1, len(run.step.members)),
        log_every=config.log.every, tensorboard=config.log.tensorboard,
        image_every=config.log.image_every, meta=meta, panels=panels,
        saved=lambda state: {"train": state, "rng": rng}, members=run.step.members,
        guard_message="lower optim.lr or check the reward before resuming")
    # Host batches are built ahead by a thread while the devices compute; metrics stay on the
    # devices until a step logs or checkpoints (fetching them every step would wait for it).
    hosts = examples_lib.prefetch(
        make_host, range(start.step * batch_size, t.num_steps * batch_size, batch_size),
        config.data.prefetch)
    state, last = loop_lib.run(loop, state, start.step, start.checkpointer, hosts, step_fn)
    _, lora = _finish(config, workdir, state, t.num_steps)
  return last, lora


def _start(config, workdir: str, run: run_lib.Run, changes: dict, rng):
  """(state, step keys' root, state shardings, loop.Start): step 0's, or the newest
  checkpoint's that restores."""
  repl = sharding.replicated(run.mesh)
  init_key = run_lib.step_keys(config.seed)[0]
  # State: born sharded (LoRA and optimizer state are small: replicated). lora.init's tree
  # is an argument, not a constant folded into the program.
  init = lambda key, unet, start: run.step.init_state(key, unet, start)
  abstract_state = jax.eval_shape(init, init_key, run.frozen["unet"], run.step.start)
  # A sweep's states are stacked [N, ...]: over the mesh's "sweep" axis where it has one.
  state_sharding = sharding.stacked(run.mesh) if run.step.members else repl
  state_shardings = jax.tree.map(lambda _: state_sharding, abstract_state)
  state = jax.jit(init, out_shardings=state_shardings)(init_key, run.frozen["unet"],
                                                       run.step.start)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        {"train": abstract_state, "rng": jax.eval_shape(lambda: rng)},
                        {"train": state_shardings, "rng": repl})
  start = loop_lib.restore(workdir, config.checkpoint, target, changes=changes, config=config)
  if start.restored is not None:
    state, rng = start.restored["train"], start.restored["rng"]
    logging.info("resuming from checkpoint step %d in %s (data position %d)", start.step,
                 os.path.join(workdir, "checkpoints"), start.meta["position"])
    # The restored optimizer state holds the saving run's rate and Adam constants: this
    # run's config is what applies (resume.SAFE lets a resume change them).
    refresh = lambda s: s.replace(opt_state=optimizer_lib.with_hyperparams(config.optim,
                                                                           s.opt_state))
    if run.step.members:  # each member's state (stacked)
      refresh = jax.vmap(refresh)
    state = jax.jit(refresh, out_shardings=state_shardings)(state)
  return state, rng, state_shardings, start


def _finish(config, workdir: str, state, step: int) -> tuple[dict, dict]:
  """The end of training: the LoRA file (written only now, with its step in its metadata).
  Returns (the last logged metrics, the LoRA on every host: stacked [N, ...] in a sweep)."""
  # Gathered to every process (a sweep's members may be sharded over the "sweep" axis).
  lora = jax.tree.map(distributed.gather, state.lora)
  members = config_sweep.labels(config)
  files = ([(lora, os.path.join(workdir, "lora.safetensors"))] if not members else
           [(sweep.member(lora, i), sweep.export_path(workdir, name))
            for i, name in enumerate(members)])
  if distributed.is_writer():
    for tree, path in files:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      checkpoint.export_lora_safetensors(tree, path, alpha=config.lora.alpha,
                                         rank=config.lora.rank, step=step)
  return log_lib.last_row(workdir), lora


def _panels(run: run_lib.Run, writer, state, batch, step: int) -> None:
  """TensorBoard panels Î0 | mask overlay | Î for the current batch (every process computes
  and gathers; process 0 writes)."""
  inputs = {k: v for k, v in batch.items() if k not in ("reference", "mask", "index")}
  if "reference" in batch:  # cached
    reference, mask = batch["reference"], batch["mask"]
  else:
    reference, mask = run.reference_fn(run.frozen, inputs)
  images = run.eval_images_fn(state.lora, run.frozen, inputs)
  reference, mask, images = (distributed.gather(x) for x in (reference, mask, images))
  if not run.step.members:
    writer.images(step, "reference_mask_finetuned", log_lib.panel(reference, mask, images))
  for i, name in enumerate(run.step.members):  # a sweep: one panel per member
    writer.images(step, f"reference_mask_finetuned/{name}",
                  log_lib.panel(reference, mask, images[i]))
