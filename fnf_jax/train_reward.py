"""The `train_reward` job: trains a heatmap reward model on a reward dataset (configs/rahf.py).

    python -m fnf_jax.main --config=configs/rahf.py --workdir=DIR

The data (`data.name`, fnf_jax/data/reward_data.py) is prepared first (its TFDS build, once,
by process 0), then the model (`model.name`, fnf_jax/rewards/trainable.py) loads, so a missing
file of either stops the run before anything slow. Every head the model and the dataset share is
trained with the paper's losses:

    loss = loss.heatmap_weight · Σ_k mean((heatmap_k - map_k)²)
         + loss.score_weight   · Σ_k mean((score_k - score_k*)²)

(loss.heatmap = "bce" puts per-pixel binary cross-entropy in place of the heatmaps' squared
error: sparse maps then do not collapse to zero; the toy world's defect net trains so.)

Parameters and optimizer state are sharded by the modules' logical axes (`sharding_rules`), the
batch over the mesh's data axes, the step jitted with those shardings. Orbax checkpoints every
`checkpoint.every` steps (and on SIGTERM) resume to the same end as an uninterrupted run: a
batch is a function of the step (reward_data.TrainBatch), and nothing else is random. Scalars go
to WORKDIR/metrics.jsonl and TensorBoard, with panels image | true | predicted heatmap every
`log.image_every` steps. At the end the weights are exported to WORKDIR/export/ in the layout
the reward of the same family loads, then evaluated (`eval_reward`, fnf_jax/eval_reward.py).
"""

import dataclasses
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fnf_jax import checkpoint
from fnf_jax import distributed
from fnf_jax import errors
from fnf_jax import metrics as metrics_lib
from fnf_jax import optimizer as optimizer_lib
from fnf_jax import record
from fnf_jax import runlock
from fnf_jax import sharding
from fnf_jax import validate
from fnf_jax.data import reward_data
from fnf_jax.data import tfds_lib
from fnf_jax.rewards import trainable as trainable_lib

EXPORT = "export"


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  config: object
  mesh: jax.sharding.Mesh
  rules: tuple
  builder: object  # the prepared TFDS builder
  dropped: list  # records the build left out
  model: trainable_lib.Trainable
  decode: reward_data.Decode
  heatmaps: tuple[str, ...]  # the heads trained / evaluated
  scores: tuple[str, ...]


def setup(config, workdir: str) -> Setup:
  """Mesh, data (built if needed), then the model; the heads they share."""
  distributed.initialize(config.distributed)
  mesh = sharding.make_mesh(dict(config.mesh))
  validate.check_batch(config, mesh.size)
  if config.eval.batch_size % mesh.size:
    raise validate.ConfigError(f"config.eval.batch_size = {config.eval.batch_size} is not "
                               f"divisible by the mesh size {mesh.size}: use a multiple of it")
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                for k, v in config.sharding_rules)
  dataset = reward_data.get(config.data.name)
  kwargs = {"config": config.data.builder_config} if config.data.builder_config else {}
  builder, dropped = tfds_lib.prepare(
      reward_data.builder_class(dataset), data_dir=data_dir(config, workdir),
      manual_dir=config.data.manual_dir if dataset.manual else None, **kwargs)
  model = trainable_lib.build(config.model)
  unknown = ([k for k in model.heatmaps if k not in dataset.heatmaps]
             + [k for k in model.scores if k not in dataset.scores])
  if unknown:
    raise validate.ConfigError(
        f"model {model.name!r} has head(s) {unknown} that data.name = {config.data.name!r} has "
        f"no targets for (it has heatmaps {sorted(dataset.heatmaps)}, scores "
        f"{sorted(dataset.scores)})")
  decode = reward_data.Decode(
      image_size=tuple(model.image_size), heatmap_size=tuple(model.heatmap_size),
      heatmaps=tuple((k, dataset.heatmaps[k]) for k in model.heatmaps),
      scores=tuple((k, dataset.scores[k]) for k in model.scores))
  return Setup(config, mesh, rules, builder, dropped, model, decode, model.heatmaps,
               model.scores)


def data_dir(config, workdir: str) -> str:
  return config.data.data_dir or os.path.join(workdir, "tfds")


def rows(run: Setup, size: int) -> tuple[int, ...]:
  """This process's rows of a global batch of `size`."""
  return tuple(distributed.local_rows(sharding.batch_sharding(run.mesh, 1, run.rules), (size,)))


def device_batch(run: Setup, host: dict, size: int) -> dict:
  """The arrays of a host batch (this process's rows) as global arrays; prompts as the
  model's token ids."""
  arrays = {k: v for k, v in host.items() if k not in ("prompt", "valid")}
  if run.model.tokenize is not None:
    arrays["reward_ids"] = np.asarray(run.model.tokenize(host["prompt"]), np.int32)
  shardings = {k: sharding.batch_sharding(run.mesh, np.ndim(v), run.rules)
               for k, v in arrays.items()}
  return distributed.global_batch(arrays, shardings, size, {k: 0 for k in arrays})


def param_shardings(run: Setup):
  return sharding.logical_shardings(run.model.abstract(), run.mesh, run.rules)


def predict(run: Setup, params, batch) -> tuple[dict, dict]:
  """The model's heatmaps and scores on a device batch."""
  return run.model.apply(params, reward_data.unit(batch["image"]), batch.get("reward_ids"))


def losses(run: Setup, params, batch) -> tuple[jax.Array, dict]:
  """(loss, {term: value}) of the module docstring's loss on `batch`."""
  heat, scores = predict(run, params, batch)
  loss_cfg = run.config.loss
  per_pixel = HEATMAP_LOSSES[loss_cfg.heatmap]
  true = {k: reward_data.unit(batch[f"heatmap/{k}"]) for k in run.heatmaps}
  terms = {f"heatmap_{loss_cfg.heatmap}/{k}": jnp.mean(per_pixel(heat[k], true[k]))
           for k in run.heatmaps}
  terms.update({f"score_mse/{k}": jnp.mean(jnp.square(scores[k] - batch[f"score/{k}"]))
                for k in run.scores})
  loss = (loss_cfg.heatmap_weight * sum(terms[f"heatmap_{loss_cfg.heatmap}/{k}"]
                                        for k in run.heatmaps)
          + loss_cfg.score_weight * sum(terms[f"score_mse/{k}"] for k in run.scores))
  if loss_cfg.heatmap != "mse":  # the paper's metric, logged whatever the loss
    terms.update({f"heatmap_mse/{k}": jnp.mean(jnp.square(heat[k] - true[k]))
                  for k in run.heatmaps})
  return loss, terms


def _bce(p, t):
  # On probabilities (what the heads output), clipped: log(0) would be -inf.
  p = jnp.clip(p, BCE_EPS, 1 - BCE_EPS)
  return -(t * jnp.log(p) + (1 - t) * jnp.log1p(-p))


BCE_EPS = 1e-6
# Per-pixel heatmap losses (config loss.heatmap): RAHF's MSE, or binary cross-entropy, whose
# gradient does not vanish where a sigmoid head saturates (a sparse map's usual failure: the
# head learns "zero everywhere" and stays there).
HEATMAP_LOSSES = {"mse": lambda p, t: jnp.square(p - t), "bce": _bce}


def make_train_step(run: Setup, opt: optax.GradientTransformation):
  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    (loss, terms), grads = jax.value_and_grad(
        lambda p: losses(run, p, batch), has_aux=True)(state["params"])
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads)}
    ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    # A non-finite step is not applied (the run stops when the host sees it).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return {"params": keep(optax.apply_updates(state["params"], updates), state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + 1}, metrics
  return train_step


def train(config, workdir: str) -> dict:
  """The `train_reward` job; returns the evaluation report of the exported weights."""
  changes = record.check_resume(config, workdir)
  distributed.initialize(config.distributed)
  from fnf_jax import eval_reward  # pylint: disable=import-outside-toplevel
  with runlock.hold(workdir, distributed.is_writer()):
    run = setup(config, workdir)
    return eval_reward.evaluate(run, workdir, _fit(run, workdir, changes))


def _fit(run: Setup, workdir: str, changes: dict) -> str:
  config, mesh = run.config, run.mesh
  opt = optimizer_lib.optimizer(config.optim)
  p_shardings = param_shardings(run)
  repl = sharding.replicated(mesh)
  with mesh, nn.logical_axis_rules(run.rules):
    params = sharding.put(run.model.init(), p_shardings)
    # The optimizer's moments come out sharded like the params they follow (XLA propagates the
    # params' shardings through zeros_like); its counters, made from nothing, land on one
    # device: those are replicated over the mesh.
    everywhere = set(mesh.devices.flat)
    opt_state = jax.jit(opt.init)(params)
    o_shardings = jax.tree.map(lambda x: x.sharding if x.sharding.device_set == everywhere
                               else repl, opt_state)
    opt_state = jax.device_put(opt_state, o_shardings)  # moves only the counters
    state = {"params": params, "opt_state": opt_state,
             "step": jax.device_put(jnp.zeros((), jnp.int32), repl)}
    s_shardings = {"params": p_shardings, "opt_state": o_shardings, "step": repl}
    if distributed.is_writer():
      checkpoint.remove_stale_temporaries(os.path.join(workdir, "checkpoints"))
    distributed.barrier("stale-checkpoints-removed")
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   keep=config.checkpoint.keep, every=config.checkpoint.every)
    start = ckpt.latest_step() or 0
    if start:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            state, s_shardings)
      state = ckpt.restore(start, {"train": target})[0]["train"]
      state["opt_state"] = jax.jit(lambda o: optimizer_lib.with_hyperparams(config.optim, o),
                                   out_shardings=o_shardings)(state["opt_state"])
      logging.info("resuming from checkpoint step %d in %s", start, ckpt.directory)
    if distributed.is_writer():
      record.write(config, workdir, changes, start or None)
    steps, size = config.train.num_steps, config.data.batch_size
    source = run.builder.as_data_source(reward_data.get(config.data.name).train_split)
    batch_at = reward_data.TrainBatch(source, run.decode, size, rows(run, size), config.seed)
    jitted = jax.jit(make_train_step(run, opt), out_shardings=(s_shardings, repl),
                     donate_argnums=0)
    predict_fn = jax.jit(functools.partial(predict, run))  # for the panels: compiled once
    writer = metrics_lib.MetricWriter(workdir, tensorboard=config.log.tensorboard,
                                      resume_step=start)
    stop = checkpoint.install_preemption_handler()
    hosts = reward_data.stream(batch_at, range(start, steps), config.data.workers)
    pending, tic, done = [], time.perf_counter(), 0
    try:
      for step, host in zip(range(start, steps), hosts):
        batch = device_batch(run, host, size)
        state, m = jitted(state, batch)
        pending.append((step + 1, m))
        done += 1
        preempted = stop(step + 1)
        final = preempted or step + 1 == steps
        # Step 1 too: the untrained model's loss, the line a user first waits for.
        logs = (step + 1) % config.log.every == 0 or step + 1 in (1, steps)
        if logs or final or (step + 1) % config.checkpoint.every == 0:
          last = _fetch(pending)
          pending = []
        if logs:
          elapsed = time.perf_counter() - tic
          ips = done * size / elapsed
          writer.scalars(step + 1, {**last, "examples_per_second": ips})
          logging.info(metrics_lib.console_line(step + 1, steps, last, ips,
                                                (steps - step - 1) * elapsed / done))
        if config.log.image_every and (step + 1) % config.log.image_every == 0:
          _panels(run, predict_fn, writer, state["params"], batch, step + 1)
        ckpt.save(step + 1, {"train": state}, {"step": step + 1}, force=final)
        if preempted:
          logging.warning("SIGTERM received: saved step %d, exiting with status 143", step + 1)
          break
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
      stop.uninstall()
    if int(jax.device_get(state["step"])) < steps:
      raise SystemExit(143)
    return export(run, workdir, state["params"], steps)


def _fetch(pending: list) -> dict:
  """The steps' metrics to host; stops at the first non-finite loss."""
  for step, m in zip([s for s, _ in pending], jax.device_get([m for _, m in pending])):
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      raise errors.StopError(f"non-finite loss or gradient at step {step} (loss {m['loss']}, "
                             f"grad_norm {m['grad_norm']}); the step was not applied. Lower "
                             "optim.lr, or check the data, before resuming")
  return {k: float(v) for k, v in m.items()}


def _panels(run: Setup, predict_fn, writer, params, batch, step: int) -> None:
  """TensorBoard panels image | true | predicted heatmap for each heatmap head (a few rows)."""
  heat, _ = predict_fn(params, batch)
  images = distributed.gather(batch["image"])[:4]
  for k in run.heatmaps:
    true = reward_data.unit(distributed.gather(batch[f"heatmap/{k}"])[:4])
    writer.images(step, f"heatmap/{k}: image|true|predicted", metrics_lib.heatmap_panel(
        images, true, distributed.gather(heat[k])[:4]))


def export(run: Setup, workdir: str, params, step: int) -> str:
  """The weights in the layout the family's reward loads: WORKDIR/export/<file> (process 0)."""
  path = os.path.join(workdir, EXPORT, run.model.export_name)
  host = jax.tree.map(np.asarray, jax.device_get(params))
  if distributed.is_writer():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    run.model.save(path, host, {"step": str(step), "dataset": run.config.data.name})
    logging.info("exported the step-%d weights to %s", step, path)
  distributed.barrier("reward-exported")
  return path
