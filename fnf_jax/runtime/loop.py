"""The training loop every trainer shares: restore, step, guard, log, checkpoint, stop.

A trainer (the Focus-N-Fix trainer in fnf_jax/jobs/train.py, the reward trainer in
fnf_jax/jobs/train_reward.py, the toy world's pretraining) builds its state, its compiled step
and its batches, and hands them to two functions:

    start = loop.restore(workdir, checkpoint_cfg, target, changes, config)
    state, last = loop.run(Loop(...), state, start.step, start.checkpointer, hosts, step_fn)

`restore` opens WORKDIR/checkpoints, removes what a killed save left behind, restores the
newest checkpoint that restores (a broken one is moved aside to checkpoints.broken/ and the one
before it tried), stops a run whose disk cannot hold its next checkpoint (before anything is
compiled), and writes the run record (fnf_jax/runtime/resume.py; the same settings go into every
checkpoint). `run` steps from there:
every step's metrics stay on the devices until a step logs or checkpoints, and are then all
checked (a non-finite loss, gradient or update stops the run with `NonFiniteLossError` before
anything after it is saved); scalars go to WORKDIR/metrics.jsonl (and TensorBoard); a
checkpoint every `checkpoint.every` steps and at the end; SIGTERM saves the step and raises
`Preempted` (exit status 143). Whatever happens, the batch source, the checkpointer (after its
last write) and the log are closed.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from absl import logging

from fnf_jax.config import errors
from fnf_jax.runtime import checkpoint
from fnf_jax.runtime import distributed
from fnf_jax.runtime import log as log_lib
from fnf_jax.runtime import resume


class NonFiniteLossError(errors.StopError, FloatingPointError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Preempted(SystemExit):
  """SIGTERM: the run saved a checkpoint and stops with exit status 143 (128 + SIGTERM), which
  restart policies treat as a failure to retry; the run's final exports are not written."""

  def __init__(self, step: int):
    super().__init__(143)
    self.step = step


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run starts: its checkpointer, the restored checkpoint (None for a new run)."""
  checkpointer: checkpoint.Checkpointer
  step: int  # 0 for a new run
  restored: Any  # the restored tree (like `target`), or None
  meta: dict | None  # the checkpoint's metadata, or None


def restore(workdir: str, checkpoint_cfg, target, *, changes: dict, config) -> Start:
  """Opens WORKDIR/checkpoints and restores the newest checkpoint that restores into `target`
  (abstract arrays with their shardings), then writes the run record (process 0).

  `changes` are the settings that differ from the checkpoint's run (`resume.check_resume`),
  logged here as applied.
  """
  folder = os.path.join(workdir, "checkpoints")
  if distributed.is_writer():
    checkpoint.remove_stale_temporaries(folder)
  distributed.barrier("stale-checkpoints-removed")
  # Saved with every checkpoint: a resume is checked against them (resume.check_resume).
  ckpt, latest, restored, meta = _restore_newest(folder, checkpoint_cfg, target,
                                                 resume.as_json(config))
  _check_space(ckpt, target, latest, config)
  if distributed.is_writer():
    resume.write(config, workdir, changes, latest)
  for key, (old, new) in changes.items():
    logging.info("resuming with a changed setting (applied): %s %r -> %r", key, old, new)
  if latest is None:
    logging.info("starting a new run in %s", workdir)
  return Start(ckpt, latest or 0, restored, meta)


def _check_space(ckpt: checkpoint.Checkpointer, target, latest: int | None, config) -> None:
  """Stops a run whose disk cannot hold its next checkpoint now, before anything is compiled
  or written (checkpoint.DiskFullError), rather than at its first save. A finished run (its
  config's train.num_steps reached) saves nothing and is let through."""
  final = (config.get("train") or {}).get("num_steps") if hasattr(config, "get") else None
  if latest is not None and isinstance(final, int) and latest >= final:
    return
  try:
    ckpt.check_space(target, "starting the run")
  except checkpoint.DiskFullError:
    ckpt.close()
    raise


def _restore_newest(folder: str, checkpoint_cfg, target, settings: dict | None = None):
  """(checkpointer, step, restored, meta) of the newest checkpoint that restores; (.., None,
  None, None) for a new run. A checkpoint that fails is reported in one line, moved aside to
  FOLDER.broken/ (not deleted) and the one before it is tried. `settings` are saved with each
  new checkpoint."""
  broken = []
  while True:
    ckpt = checkpoint.Checkpointer(folder, keep=checkpoint_cfg.keep, every=checkpoint_cfg.every,
                                   settings=settings)
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


@dataclasses.dataclass(frozen=True)
class Loop:
  """How a trainer's steps are run, logged and saved."""
  workdir: str
  num_steps: int
  batch_size: int  # rows per step, for the rate
  log_every: int
  tensorboard: bool
  rate_name: str = "images_per_second"  # the logged throughput's name
  log_first: bool = False  # also log step 1 (an untrained model's loss)
  image_every: int = 0  # call `panels` every this many steps (0: never)
  # (step) -> the checkpoint's metadata; default {"step": step}
  meta: Callable[[int], dict] | None = None
  # (writer, state, device batch, step) -> None: TensorBoard images
  panels: Callable[..., None] | None = None
  # state -> the tree a checkpoint holds (e.g. the state with the run's key)
  saved: Callable[[Any], Any] = lambda state: {"train": state}
  guard_message: str = "lower optim.lr, or check the reward and the data, before resuming"
  # A sweep's member labels (fnf_jax/fnf/sweep.py): each metric is then [N], logged as
  # "<name>/<label>" per member. () for a single run.
  members: tuple = ()


def run(loop: Loop, state, start: int, ckpt: checkpoint.Checkpointer, hosts: Iterable,
        step_fn: Callable[[Any, Any, int], tuple[Any, dict, Any]]) -> tuple[Any, dict]:
  """Runs steps start .. loop.num_steps - 1; returns (state, the last fetched metrics).

  `hosts` yields one host batch per step from `start` on; `step_fn(state, host, step)` returns
  (state, device metrics, device batch). Raises `Preempted` on SIGTERM (after saving) and
  `NonFiniteLossError` at the first non-finite step (which the step did not apply).
  """
  writer = log_lib.MetricWriter(loop.workdir, tensorboard=loop.tensorboard, resume_step=start)
  stop = checkpoint.install_preemption_handler()
  steps = loop.num_steps
  last, pending, tic, done, preempted = {}, [], time.perf_counter(), 0, False
  reached = start
  try:
    for step, host in zip(range(start, steps), hosts):
      state, m, batch = step_fn(state, host, step)
      reached = step + 1
      pending.append((step + 1, m))
      done += 1
      preempted = stop(step + 1)
      final = preempted or step + 1 == steps
      logs = ((step + 1) % loop.log_every == 0 or step + 1 == steps
              or (loop.log_first and step == 0))
      if logs or final or (step + 1) % ckpt.every == 0:
        # Every fetched step's loss is checked, and always before a checkpoint is written.
        last = _fetch(pending, ckpt, loop.guard_message, loop.members)
        pending = []
      if logs:
        elapsed = time.perf_counter() - tic
        rate = done * loop.batch_size / elapsed
        writer.scalars(step + 1, {**last, loop.rate_name: rate})
        logging.info(log_lib.console_line(step + 1, steps, last, rate,
                                          (steps - step - 1) * elapsed / done))
      if loop.panels is not None and loop.image_every and (step + 1) % loop.image_every == 0:
        loop.panels(writer, state, batch, step + 1)
      meta = loop.meta(step + 1) if loop.meta else {"step": step + 1}
      ckpt.save(step + 1, loop.saved(state), meta, force=final)
      if preempted:
        logging.warning("SIGTERM received: saved step %d, exiting with status 143 (to be "
                        "restarted: the next run resumes there)", step + 1)
        break
    if not preempted and reached < steps:
      raise RuntimeError(f"the batch source ended at step {reached} of {steps}")
  finally:
    close = getattr(hosts, "close", None)
    if close is not None:
      close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    stop.uninstall()
  if preempted:
    raise Preempted(reached)
  return state, last


# The metrics a step may report whose non-finite value stops the run (besides the loss).
GUARDED = ("loss", "grad_norm", "update_norm")


def per_member(metrics: dict, members: tuple) -> dict:
  """A sweep's metrics ([N] each) as one scalar per member: "loss/beta=0.1", ..."""
  if not members:
    return metrics
  return {f"{k}/{name}": v[i] for k, v in metrics.items() for i, name in enumerate(members)}


def _fetch(pending: list, ckpt, advice: str, members: tuple = ()) -> dict:
  """The device metrics of the steps since the last fetch, to host; raises at the first
  non-finite one among them (any member's, in a sweep). Returns the newest step's metrics as
  floats."""
  for step, m in zip([s for s, _ in pending], jax.device_get([m for _, m in pending])):
    m = per_member(m, members)
    base = lambda k: k.split("/")[0]
    bad = [k for k in m if base(k) in GUARDED and not np.isfinite(m[k])]
    if bad or any(m[k] for k in m if base(k) == "nonfinite"):
      ckpt.wait()
      latest = ckpt.latest_step()
      good = ("none was written yet" if latest is None else
              f"step {latest} in {ckpt.directory}")
      shown = ", ".join(f"{k} {m[k]}" for k in m if base(k) in GUARDED)
      raise NonFiniteLossError(
          f"non-finite {', '.join(bad) or 'weights'} at step {step} ({shown}); the step was "
          f"not applied and nothing after it was saved. Last good checkpoint: {good}; {advice}")
  return {k: float(v) for k, v in m.items()}
