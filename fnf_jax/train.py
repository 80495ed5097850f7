"""The training loop: mesh -> load -> reference -> state -> compiled step -> restore -> loop.

Jobs (chosen by config.job): `train` runs the loop; `cache` computes the reference (Î0, M) of
every training example once (see fnf_jax/reference.py). `setup` is the one place a run's pieces
are built (the step's functions, jitted once): both jobs and the toy demo take a `Run` from it.
"""

import dataclasses
import os
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from fnf_jax import checkpoint
from fnf_jax import distributed
from fnf_jax import errors
from fnf_jax import optimizer as optimizer_lib
from fnf_jax import record
from fnf_jax import runlock
from fnf_jax import metrics as metrics_lib
from fnf_jax import pipeline as pipeline_lib
from fnf_jax import reference as reference_lib
from fnf_jax import random_models
from fnf_jax import sharding
from fnf_jax import step_program
from fnf_jax import train_step
from fnf_jax import validate
from fnf_jax.data import examples as examples_lib
from fnf_jax.data import prompts as prompts_lib
from fnf_jax.rewards import registry


class NonFiniteLossError(errors.StopError, FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class Run:
  """Everything a job needs, built once from the config."""
  config: object
  pipe: pipeline_lib.Pipeline
  reward: registry.Reward
  step: train_step.Step
  mesh: jax.sharding.Mesh
  rules: tuple
  frozen: dict
  frozen_shardings: dict
  examples: list
  # step.reference / step.eval_images jitted once for the run (cache job, panels, evaluation).
  reference_fn: object
  eval_images_fn: object


def load_pipeline(config) -> pipeline_lib.Pipeline:
  if config.model.path == "tiny":
    return random_models.random_pipeline(config.seed, attention_impl=config.model.attention,
                                         unet_remat=config.model.unet_remat,
                                         vae_remat=config.model.vae_remat)
  return pipeline_lib.load(config.model.path, dtype=config.model.dtype,
                           attention_impl=config.model.attention,
                           unet_remat=config.model.unet_remat, vae_remat=config.model.vae_remat)


def training_examples(config, pipe, split: str = "train", reward=None) -> list:
  prompts, _ = prompts_lib.load(config.prompts, split,
                                limits=examples_lib.prompt_limits(pipe, reward))
  return examples_lib.make_examples(prompts, config.data.seeds_per_prompt, config.seed)


# What the loaded weights depend on: a Run of another config may share them when these agree.
SHARED_WEIGHTS = ("model", "reward", "mesh", "sharding_rules", "distributed")


def setup(config, base: Run | None = None) -> Run:
  """The run of a validated `config` (fnf_jax.validate): mesh, models, reward, examples, step.

  `base`: a Run whose config agrees on SHARED_WEIGHTS; its mesh, pipeline, reward and placed
  weights are reused, and only this config's step and examples are built (the demo's DRaFT and
  Focus-N-Fix runs load the model once).
  """
  if base is None:
    distributed.initialize(config.distributed)
    mesh = sharding.make_mesh(dict(config.mesh))
    validate.check_batch(config, mesh.size)
    rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                  for k, v in config.sharding_rules)
    pipe = load_pipeline(config)
    reward = registry.build(config.reward)
    abstract = pipe.abstract_params()
    frozen_shardings = {name: sharding.logical_shardings(abstract[name], mesh, rules)
                        for name in abstract}
    frozen_shardings["reward"] = jax.tree.map(lambda _: sharding.replicated(mesh), reward.params)
    frozen = sharding.put({**pipe.params, "reward": reward.params}, frozen_shardings)
  else:
    differ = [k for k in SHARED_WEIGHTS if _json(config[k]) != _json(base.config[k])]
    if differ:
      raise ValueError(f"setup(config, base=...): config.{differ[0]} differs from the base run's;"
                       f" a run shares the loaded weights only when {SHARED_WEIGHTS} agree")
    mesh, rules, pipe, reward = base.mesh, base.rules, base.pipe, base.reward
    frozen, frozen_shardings = base.frozen, base.frozen_shardings
  step = train_step.build(pipe, reward, config)
  return Run(config=config, pipe=pipe, reward=reward, step=step, mesh=mesh, rules=rules,
             frozen=frozen, frozen_shardings=frozen_shardings,
             examples=training_examples(config, pipe, reward=reward),
             reference_fn=jax.jit(step.reference), eval_images_fn=jax.jit(step.eval_images))


def _json(value) -> str:
  return value.to_json() if hasattr(value, "to_json") else repr(value)


def batch_axis(key: str) -> int:
  """The batch axis of a step input: token ids [E, B, 77] and noise [S, B, ...] on axis 1."""
  return 1 if key in ("ids", "neg_ids", "noise") else 0


def batch_shardings(batch: dict, mesh, rules) -> dict:
  return {k: sharding.batch_sharding(mesh, np.ndim(v), rules, axis=batch_axis(k))
          for k, v in batch.items()}


def local_rows(size: int, mesh, rules) -> range:
  """The rows of a global batch of `size` that this process's devices hold (all of them with
  one process)."""
  return distributed.local_rows(sharding.batch_sharding(mesh, 1, rules), (size,))


def host_rows(pipe, examples: list, config, rows: range, cached=None, reward=None) -> dict:
  """This process's rows of the global batch `examples`, as numpy arrays: tokens, x_T (and
  sampler noise), and with a cache its Î0 and M, read for these rows only."""
  s = config.sampling
  batch = examples_lib.host_batch(pipe, examples[rows.start:rows.stop],
                                  negative_prompt=s.negative_prompt, num_steps=s.num_steps,
                                  eta=s.eta, reward=reward)
  if cached is not None:
    batch["reference"], batch["mask"] = cached.get(batch["index"])
  return batch


def to_global(host: dict, shardings: dict, size: int) -> dict:
  """Each process's rows (`host_rows`) -> the global batch of `size` rows as jax.Arrays."""
  return distributed.global_batch(host, shardings, size, {k: batch_axis(k) for k in host})


def local_batch(pipe, examples: list, config, mesh, rules, reward=None) -> tuple[dict, dict]:
  """(global batch, its shardings) of the examples, each process building only its rows."""
  host = host_rows(pipe, examples, config, local_rows(len(examples), mesh, rules),
                   reward=reward)
  shardings = batch_shardings(host, mesh, rules)
  return to_global(host, shardings, len(examples)), shardings


# ------------------------------------------------------------------------------------- cache


def cache(config, workdir: str, run: Run | None = None) -> str:
  """The `cache` job: writes the reference of every training example to WORKDIR/reference."""
  with _workdir_held(config, workdir, run):
    return _cache(config, workdir, run or setup(config))


def _cache(config, workdir: str, run: Run) -> str:
  # Outputs sharded like the batch, so that each process holds (and writes) its own rows.
  out = (sharding.batch_sharding(run.mesh, 4, run.rules), sharding.batch_sharding(run.mesh, 3,
                                                                                   run.rules))
  with run.mesh, nn.logical_axis_rules(run.rules):
    reference = jax.jit(run.step.reference, out_shardings=out)
    compute = reference_lib.compute_fn(reference, run.frozen, run.pipe, config, mesh=run.mesh,
                                       rules=run.rules, reward=run.reward)
    return reference_lib.write(workdir, config, run.examples, compute,
                             shard_size=config.cache.shard_size,
                                 batch_size=config.data.batch_size, dtype=config.cache.dtype)


# ------------------------------------------------------------------------------------- train


def select_examples(config, examples: list, cached) -> list:
  """The examples to train on: all, or (data.min_mask_area > 0) those whose cached mask M of Î0
  covers at least that fraction of the image, i.e. where the reward found something to fix."""
  threshold = config.data.min_mask_area
  if threshold <= 0:
    return examples
  if cached is None:
    raise ValueError("data.min_mask_area > 0 selects examples by their cached mask: it needs "
                     "train.reference = 'cache' (and the cache job run first)")
  chosen = [e for e in examples if cached.area(e.index) >= threshold]
  logging.info("data.min_mask_area = %g: training on %d of %d examples", threshold, len(chosen),
               len(examples))
  if len(chosen) < config.data.batch_size:
    raise ValueError(f"only {len(chosen)} of {len(examples)} examples have a mask covering >= "
                     f"{threshold} of the image, fewer than one batch ({config.data.batch_size}):"
                     " lower data.min_mask_area or add prompts / data.seeds_per_prompt")
  return chosen


def train(config, workdir: str) -> dict:
  """The `train` job. Returns the last logged metrics (host floats)."""
  return fit(config, workdir)[0]


def fit(config, workdir: str, run: Run | None = None) -> tuple[dict, dict]:
  """Trains (or resumes) the run in `workdir`: (last logged metrics, final LoRA params on host).

  `run`: the Run of `config` from `setup`, when the caller has one.
  """
  # A resume whose settings differ where a checkpoint cannot follow fails here, before
  # anything loads; a bad config or cluster fails in setup, before the workdir exists.
  changes = record.check_resume(config, workdir)
  with _workdir_held(config, workdir, run):
    return _fit(config, workdir, run or setup(config), changes)


def _workdir_held(config, workdir: str, run: Run | None):
  """WORKDIR/run.lock, taken before the models load (the processes must know which of them is
  process 0, hence the cluster first): a second run, or an unwritable workdir, stops at once."""
  if run is None:
    distributed.initialize(config.distributed)
    # The batch against the devices, known now: a bad one leaves no workdir behind.
    validate.check_batch(config, sharding.make_mesh(dict(config.mesh)).size)
  return runlock.hold(workdir, distributed.is_writer())


class Preempted(SystemExit):
  """SIGTERM: the run saved a checkpoint and stops with exit status 143 (128 + SIGTERM), which
  restart policies treat as a failure to retry; the final LoRA file is not written."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


def _fit(config, workdir: str, run: Run, changes: dict) -> tuple[dict, dict]:
  t, mesh = config.train, run.mesh
  cached = None
  if t.reference == "cache":
    if not reference_lib.is_complete(workdir):
      # A fresh workdir: compute the cache first (every process), so one command trains.
      logging.info("no reference cache in %s yet: computing it first", workdir)
      _cache(config, workdir, run)
    cached = reference_lib.Cache(workdir, config, run.examples)
  examples = select_examples(config, run.examples, cached)
  feed = examples_lib.Feed(examples, config.data.batch_size, config.seed)
  init_key = step_keys(config.seed)[0]
  repl = sharding.replicated(mesh)
  # The step keys' root as a global array (every process saves its part of the checkpoint).
  rng = jax.jit(lambda: step_keys(config.seed)[1], out_shardings=repl)()

  # The mesh context and rules make the modules' nn.with_logical_constraint calls take effect.
  with mesh, nn.logical_axis_rules(run.rules):
    # State: born sharded (LoRA and optimizer state are small: replicated). lora.init's tree
    # is an argument, not a constant folded into the program.
    init = lambda key, unet, start: run.step.init_state(key, unet, start)
    abstract_state = jax.eval_shape(init, init_key, run.frozen["unet"], run.step.start)
    state_shardings = jax.tree.map(lambda _: repl, abstract_state)
    state = jax.jit(init, out_shardings=state_shardings)(init_key, run.frozen["unet"],
                                                         run.step.start)
    # Resume from the newest complete checkpoint, onto this mesh.
    if distributed.is_writer():
      checkpoint.remove_stale_temporaries(os.path.join(workdir, "checkpoints"))
    distributed.barrier("stale-checkpoints-removed")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          {"train": abstract_state, "rng": jax.eval_shape(lambda: rng)},
                          {"train": state_shardings, "rng": repl})
    ckpt, latest, restored, meta = _restore_newest(config, workdir, target)
    start = 0
    if distributed.is_writer():
      record.write(config, workdir, changes, latest)
    for key, (old, new) in changes.items():
      logging.info("resuming with a changed setting (applied): %s %r -> %r", key, old, new)
    if latest is not None:
      state, rng = restored["train"], restored["rng"]
      start = int(meta["step"])
      logging.info("resuming from checkpoint step %d in %s (data position %d)", start,
                   os.path.join(workdir, "checkpoints"), meta["position"])
      # The restored optimizer state holds the saving run's rate and Adam constants: this
      # run's config is what applies (record.SAFE lets a resume change them).
      state = jax.jit(lambda s: s.replace(opt_state=optimizer_lib.with_hyperparams(
          config.optim, s.opt_state)), out_shardings=state_shardings)(state)
    else:
      logging.info("starting a new run in %s", workdir)
    if start >= t.num_steps:
      logging.info("the run in %s is finished (step %d of %d): nothing to train", workdir,
                   start, t.num_steps)
      return _finish(config, workdir, state, start), jax.device_get(state.lora)

    batch_size = config.data.batch_size
    rows = local_rows(batch_size, mesh, run.rules)
    make_host = lambda p: host_rows(run.pipe, feed.batch_at(p), config, rows, cached,
                                    run.reward)
    host = make_host(0)
    b_shardings = batch_shardings(host, mesh, run.rules)
    batch_spec = {k: jax.ShapeDtypeStruct(_with(np.shape(v), batch_axis(k), batch_size), v.dtype,
                                          sharding=b_shardings[k]) for k, v in host.items()}
    # The step's pieces, compiled together ahead of the first step (step_program.py); the log
    # says how long and whether the persistent cache served them.
    compiled, _ = step_program.compile_step(
        run.step, mesh, run.rules, online_reference=t.reference == "online", state=state,
        state_shardings=state_shardings, frozen=run.frozen,
        frozen_shardings=run.frozen_shardings, batch_spec=batch_spec, rng=rng)

    writer = metrics_lib.MetricWriter(workdir, tensorboard=config.log.tensorboard,
                                      resume_step=start)
    stop = checkpoint.install_preemption_handler()
    panel_fns = (run.reference_fn, run.eval_images_fn) if config.log.image_every else None
    # Host batches are built ahead by a thread while the devices compute; metrics stay on the
    # devices until a step logs or checkpoints (fetching them every step would wait for it).
    hosts = examples_lib.prefetch(make_host,
                                  range(start * batch_size, t.num_steps * batch_size, batch_size),
                                  config.data.prefetch)
    last, pending, tic, done = {}, [], time.perf_counter(), 0
    try:
      for step, host in zip(range(start, t.num_steps), hosts):
        position = step * batch_size
        batch = to_global(host, b_shardings, batch_size)
        state, m = compiled(state, run.frozen, batch, jax.random.fold_in(rng, step))
        pending.append((step + 1, m))
        done += 1
        preempted = stop(step + 1)
        final = preempted or step + 1 == t.num_steps
        logs = (step + 1) % config.log.every == 0 or step + 1 == t.num_steps
        if logs or final or (step + 1) % config.checkpoint.every == 0:
          # Every fetched step's loss is checked, and always before a checkpoint is written.
          last = _fetch(pending, ckpt, workdir)
          pending = []
        if logs:
          elapsed = time.perf_counter() - tic
          ips = done * batch_size / elapsed
          eta = (t.num_steps - step - 1) * elapsed / done
          writer.scalars(step + 1, {**last, "images_per_second": ips})
          logging.info(metrics_lib.console_line(step + 1, t.num_steps, last, ips, eta))
        if panel_fns is not None and (step + 1) % config.log.image_every == 0:
          _panels(writer, panel_fns, run.frozen, state, batch, step + 1)
        meta = {"step": step + 1, "position": position + batch_size,
                "epoch": (position + batch_size) // len(examples)}
        ckpt.save(step + 1, {"train": state, "rng": rng}, meta, force=final)
        if preempted:
          logging.warning("SIGTERM received: saved step %d, exiting with status 143 (to be "
                          "restarted: the next run resumes there)", step + 1)
          break
    finally:
      hosts.close()
      ckpt.wait()
      ckpt.close()
      writer.close()
      stop.uninstall()
    if int(jax.device_get(state.step)) < t.num_steps:  # preempted
      raise Preempted(int(jax.device_get(state.step)))
    _finish(config, workdir, state, t.num_steps)
  return last, jax.device_get(state.lora)


def _finish(config, workdir: str, state, step: int) -> dict:
  """The end of training: the LoRA file (written only now, with its step in its metadata).
  Returns the last logged metrics."""
  lora = jax.device_get(state.lora)  # replicated: every process holds all of it
  if distributed.is_writer():
    checkpoint.export_lora_safetensors(lora, os.path.join(workdir, "lora.safetensors"),
                                       alpha=config.lora.alpha, rank=config.lora.rank,
                                       step=step)
  return metrics_lib.last_row(workdir)


def _restore_newest(config, workdir: str, target):
  """(checkpointer, step, restored, meta) of the newest checkpoint that restores; (.., None,
  None, None) for a new run. A checkpoint that fails is reported in one line, moved aside to
  WORKDIR/checkpoints.broken/ (not deleted) and the one before it is tried."""
  folder = os.path.join(workdir, "checkpoints")
  broken = []
  while True:
    ckpt = checkpoint.Checkpointer(folder, keep=config.checkpoint.keep,
                                   every=config.checkpoint.every)
    latest = ckpt.latest_step()
    if latest is None:
      if broken:
        ckpt.close()
        raise errors.StopError(
            f"no checkpoint in {folder} restores: steps {broken} failed and were moved to "
            f"{folder}.broken/. Move one back after repairing it, or delete {folder} (and "
            f"{folder}.broken) to start the run over")
      return ckpt, None, None, None
    try:
      restored, meta = ckpt.restore(latest, target)
      return ckpt, latest, restored, meta
    except Exception as e:  # pylint: disable=broad-except  # any corruption: try the one before
      ckpt.close()
      cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      aside = os.path.join(f"{folder}.broken", f"{latest}-{int(time.time())}")
      logging.error("checkpoint step %d in %s cannot be restored (%s: %s); moved to %s, trying "
                    "the one before", latest, folder, type(e).__name__, cause, aside)
      if distributed.is_writer():
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        os.rename(os.path.join(folder, str(latest)), aside)
      distributed.barrier(f"checkpoint-{latest}-moved-aside")
      broken.append(latest)


def _fetch(pending: list, ckpt, workdir: str) -> dict:
  """The device metrics of the steps since the last fetch, to host; raises at the first
  non-finite loss among them. Returns the newest step's metrics as floats."""
  for step, m in zip([s for s, _ in pending], jax.device_get([m for _, m in pending])):
    if m["nonfinite"] or not np.isfinite(m["loss"]):
      ckpt.wait()
      bad = [k for k in ("loss", "grad_norm", "update_norm") if not np.isfinite(m[k])]
      latest = ckpt.latest_step()
      good = ("none was written yet" if latest is None else
              f"step {latest} in {os.path.join(workdir, 'checkpoints')}")
      raise NonFiniteLossError(
          f"non-finite {', '.join(bad) or 'LoRA weights'} at step {step} (loss {m['loss']}, "
          f"grad_norm {m['grad_norm']}, update_norm {m['update_norm']}); the step was not "
          f"applied and nothing after it was saved. Last good checkpoint: {good}; lower "
          "optim.lr or check the reward before resuming")
  return {k: float(v) for k, v in m.items()}


def step_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(LoRA init key, root of the per-step keys `fold_in(root, step)`): two halves of one split,
  so the init key is none of the step keys."""
  init_key, root = jax.random.split(jax.random.key(seed))
  return init_key, root


def _panels(writer, panel_fns, frozen, state, batch, step):
  """TensorBoard panels Î0 | mask overlay | Î for the current batch (every process computes
  and gathers; process 0 writes)."""
  reference_fn, images_fn = panel_fns
  inputs = {k: v for k, v in batch.items() if k not in ("reference", "mask", "index")}
  if "reference" in batch:  # cached
    reference, mask = batch["reference"], batch["mask"]
  else:
    reference, mask = reference_fn(frozen, inputs)
  images = images_fn(state.lora, frozen, inputs)
  writer.images(step, "reference|mask|finetuned", metrics_lib.panel(
      *(distributed.gather(x) for x in (reference, mask, images))))


def _with(shape: tuple, axis: int, size: int) -> tuple:
  return tuple(size if i == axis else d for i, d in enumerate(shape))

