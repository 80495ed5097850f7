"""The `train_reward` job: trains a heatmap reward model on a reward dataset (configs/rahf.py).

    python -m fnf_jax.main --config=configs/rahf.py --workdir=DIR

The data (`data.name`, fnf_jax/data/reward_data.py) is prepared first (its TFDS build, once,
by process 0), then the model (`model.name`, fnf_jax/rewards/trainable.py) loads, so a missing
file of either stops the run before anything slow. Every head the model and the dataset share is
trained with the paper's losses (fnf_jax/rewards/training.py).

Parameters and optimizer state are sharded by the modules' logical axes (`sharding_rules`), the
batch over the mesh's data axes, the step jitted with those shardings. The shared training loop
(fnf_jax/runtime/loop.py) restores, guards, logs, checkpoints and stops on SIGTERM as the
Focus-N-Fix trainer does; a resumed run ends where an uninterrupted one does, since a batch is
a function of the step (reward_data.TrainBatch) and nothing else is random. TensorBoard gets
panels image | true | predicted heatmap every `log.image_every` steps. At the end the weights are
exported to WORKDIR/export/ in the layout the reward of the same family loads, then evaluated
(`eval_reward`, fnf_jax/jobs/eval_reward.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from fnf_jax.data import reward_data
from fnf_jax.data import reward_datasets
from fnf_jax.jobs import eval_reward
from fnf_jax.rewards import training
from fnf_jax.runtime import distributed
from fnf_jax.runtime import log as log_lib
from fnf_jax.runtime import loop as loop_lib
from fnf_jax.runtime import optimizer as optimizer_lib
from fnf_jax.runtime import resume
from fnf_jax.runtime import runlock
from fnf_jax.runtime import sharding


def train(config, workdir: str) -> dict:
  """The `train_reward` job; returns the evaluation report of the exported weights."""
  changes = resume.check_resume(config, workdir)
  distributed.initialize(config.distributed)
  with runlock.hold(workdir, distributed.is_writer()):
    run = training.setup(config, workdir)
    return eval_reward.evaluate(run, workdir, _fit(run, workdir, changes))


def _init(run: training.Setup, opt):
  """(state, its shardings): the model's parameters sharded by their logical axes."""
  mesh, repl = run.mesh, sharding.replicated(run.mesh)
  p_shardings = training.param_shardings(run)
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
  return state, {"params": p_shardings, "opt_state": o_shardings, "step": repl}


def _fit(run: training.Setup, workdir: str, changes: dict) -> str:
  config = run.config
  opt = optimizer_lib.optimizer(config.optim)
  with run.mesh, nn.logical_axis_rules(run.rules):
    state, s_shardings = _init(run, opt)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          state, s_shardings)
    start = loop_lib.restore(workdir, config.checkpoint, {"train": target}, changes=changes,
                             config=config)
    if start.restored is not None:
      state = start.restored["train"]
      # The saving run's rate and Adam constants are in the restored state: this run's apply.
      state["opt_state"] = jax.jit(lambda o: optimizer_lib.with_hyperparams(config.optim, o),
                                   out_shardings=s_shardings["opt_state"])(state["opt_state"])
      logging.info("resuming from checkpoint step %d in %s", start.step,
                   start.checkpointer.directory)
    steps, size = config.train.num_steps, config.data.batch_size
    source = run.builder.as_data_source(reward_datasets.get(config.data.name).train_split)
    batch_at = reward_data.TrainBatch(source, run.decode, size, training.rows(run, size),
                                      config.seed)
    jitted = jax.jit(training.make_train_step(run, opt),
                     out_shardings=(s_shardings, sharding.replicated(run.mesh)),
                     donate_argnums=0)

    def step_fn(state, host, step):
      del step  # the batch is already the step's
      batch = training.device_batch(run, host, size)
      state, metrics = jitted(state, batch)
      return state, metrics, batch

    predict_fn = jax.jit(functools.partial(training.predict, run))  # compiled once
    loop = loop_lib.Loop(
        workdir=workdir, num_steps=steps, batch_size=size, log_every=config.log.every,
        tensorboard=config.log.tensorboard, rate_name="examples_per_second",
        # Step 1 too: the untrained model's loss, the line a user first waits for.
        log_first=True, image_every=config.log.image_every,
        panels=lambda writer, state, batch, step: _panels(run, predict_fn, writer,
                                                          state["params"], batch, step),
        guard_message="lower optim.lr, or check the data, before resuming")
    hosts = reward_data.stream(batch_at, range(start.step, steps), config.data.workers)
    state, _ = loop_lib.run(loop, state, start.step, start.checkpointer, hosts, step_fn)
    return training.export(run, workdir, state["params"], steps)


def _panels(run: training.Setup, predict_fn, writer, params, batch, step: int) -> None:
  """TensorBoard panels image | true | predicted heatmap for each heatmap head (a few rows)."""
  heat, _ = predict_fn(params, batch)
  images = distributed.gather(batch["image"])[:4]
  for k in run.heatmaps:
    true = reward_data.unit(distributed.gather(batch[f"heatmap/{k}"])[:4])
    writer.images(step, f"heatmap/{k}: image|true|predicted", log_lib.heatmap_panel(
        images, true, distributed.gather(heat[k])[:4]))
