"""Checkpoints (orbax), SIGTERM preemption handling, and LoRA export for diffusers.

A checkpoint step directory holds four orbax items:
  state     the training pytree (TrainState, rng key, ...) via StandardSave, sharded arrays
            written by every process for its own shards, so saving never gathers to one host;
  meta      a small JSON dict (data position, epoch, config name, ...);
  prng      JSON {tree path: PRNG impl name} for the typed PRNG keys found in `state`;
  settings  the run's config as config.json holds it (`Checkpointer(settings=...)`), so that a
            resume is checked against the settings these weights were trained with, whatever
            became of WORKDIR/config.json (fnf_jax/runtime/resume.py; `read_settings`).
The JSON items are written by the primary process only (orbax's JsonCheckpointHandler). A save
that cannot fit on the disk is refused before anything is written (runtime/diskspace.py).

Typed PRNG keys (`jax.random.key`) are stored as their raw `jax.random.key_data` (uint32) and
re-wrapped on restore with the impl recorded at save time, so the on-disk format is plain arrays
(readable without knowing the key type) and legacy uint32 keys round-trip unchanged.

Restoring takes an abstract tree (`jax.ShapeDtypeStruct` with `sharding=`), so arrays are read
straight into the CURRENT mesh's layout, whatever mesh wrote them (e.g. 8 devices -> 1 device).
`read_newest` reads one subtree of the newest checkpoint without one (a run's LoRA, for
`fnf_jax.models.lora_io`).
"""

import functools
import json
import os
import shutil
import signal
import threading
from typing import Any

import jax
from absl import logging
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fnf_jax.models import convert
from fnf_jax.runtime import distributed
from fnf_jax.runtime import diskspace

SETTINGS = "settings"  # the item holding the run's settings: STEP/settings/metadata
DiskFullError = diskspace.DiskFullError  # raised by `save` and `check_space`
_is_key = diskspace.is_key


class Checkpointer:
  """Saves every `every` steps (async), keeps the newest `keep` complete checkpoints.

  Every process must call `save` / `restore` (orbax synchronises them); metadata is written by
  the primary process only. `save` returns once the arrays are copied off the devices, so the
  caller may donate or overwrite `state` right away; the write finishes in the background
  (`wait()` blocks for it, and must be called before exiting).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int, every: int,
               settings: dict | None = None):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"Checkpointer({directory!s}): keep must be an int >= 1, got {keep!r}")
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"Checkpointer({directory!s}): every must be an int >= 1, got {every!r}")
    directory = str(directory)
    self.keep, self.settings = keep, settings  # settings: saved with every checkpoint
    if "://" not in directory:  # orbax wants absolute local paths; keep gs:// etc. as given
      directory = os.path.abspath(directory)
    self.directory, self.every = directory, every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every,
        # `max_to_keep` is deprecated in favour of preservation policies in orbax 0.12.
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        create=True,
        # No cleanup of `*.orbax-checkpoint-tmp` dirs on open: a second reader (eval job) opening
        # the same directory would otherwise delete a save that training has in flight. Orbax
        # ignores them when listing and replaces a stale one when that step is saved again.
        cleanup_tmp_directories=False,
    )
    self._manager = ocp.CheckpointManager(directory, options=options)

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Starts saving `state` and `meta` at `step`; False if skipped.

    Skipped when `step` is not a multiple of `every` (unless `force`, e.g. at preemption or the
    final step; orbax also saves unforced at a multi-host preemption sync point) or when a
    checkpoint for `step` already exists (e.g. right after resuming from it).
    """
    step = int(step)
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      bad = [k for k, v in dict(meta).items() if not _json_ok(v)]
      raise ValueError(
          f"checkpoint meta must be JSON-serialisable; offending keys {bad}: {e}") from e
    steps = self._manager.all_steps()
    if step in steps:
      return False
    if force or step % self.every == 0 or not steps:  # orbax's policy: this step is saved
      self.check_space(state, "saving")
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    impls = {jax.tree_util.keystr(p): str(jax.random.key_impl(x)) for p, x in flat if _is_key(x)}
    state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                 prng=ocp.args.JsonSave(impls))
    if self.settings is not None:
      items[SETTINGS] = ocp.args.JsonSave(self.settings)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

  def check_space(self, state: Any, doing: str = "saving") -> int:
    """Refuses a save of `state` (arrays or their jax.ShapeDtypeStructs) that cannot fit,
    before writing a byte: DiskFullError names the folder, the bytes free and needed, and the
    earlier checkpoints stay whole (a save that fails half-way would leave only orbax's
    RESOURCE_EXHAUSTED errors). Returns the bytes needed (fnf_jax/runtime/diskspace.py)."""
    self.wait()  # the save in flight counts (orbax would wait for it before this one anyway)
    return diskspace.check(self.directory, state, self._manager.all_steps(), keep=self.keep,
                           doing=doing)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint step, or None.

    Orbax lists only finalized step directories (a preempted save leaves
    `<step>.orbax-checkpoint-tmp`, which is ignored), but it reports a step as soon as an async
    save *starts*; waiting for the in-flight save first makes the answer "complete".
    """
    self.wait()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    self.wait()
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of `step` (None: the latest), laid out as `abstract_state` says.

    `abstract_state` mirrors the saved tree; each leaf is a `jax.ShapeDtypeStruct` (or an array)
    whose `sharding` is set, e.g. `jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)` with `s`
    from `fnf_jax.runtime.sharding.logical_shardings` on the current mesh. Typed-key leaves (dtype
    key<...>) come back as typed keys.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    step = int(step)
    available = self.all_steps()
    if step not in available:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {available}")

    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    targets = []
    for path, leaf in flat:
      if getattr(leaf, "sharding", None) is None:
        raise ValueError(
            f"abstract_state{jax.tree_util.keystr(path)} has no sharding; pass "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=...) so arrays land on the current mesh")
      if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        # Trailing key-data dims are replicated: a PartitionSpec shorter than ndim means that.
        leaf = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
      elif not isinstance(leaf, jax.ShapeDtypeStruct):
        leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
      targets.append(leaf)
    target = jax.tree_util.tree_unflatten(treedef, targets)

    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore(),
        prng=ocp.args.JsonRestore()))
    impls = out.prng or {}
    leaves = treedef.flatten_up_to(out.state)
    restored = []
    for (path, abstract), value in zip(flat, leaves):
      if _is_key(abstract):
        name = jax.tree_util.keystr(path)
        if name not in impls:
          raise ValueError(f"abstract_state{name} is a PRNG key but step {step} in "
                           f"{self.directory} saved a plain array there (keys saved: "
                           f"{sorted(impls)})")
        value = jax.random.wrap_key_data(value, impl=impls[name])
      restored.append(value)
    return jax.tree_util.tree_unflatten(treedef, restored), dict(out.meta or {})

  def wait(self) -> None:
    """Blocks until the in-flight async save (if any) is written and finalized."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_newest(directory: str, keys: tuple[str, ...]) -> tuple[int, Any] | None:
  """(step, the subtree at `keys` of item "state") of the newest complete checkpoint in
  `directory`, as host numpy arrays; None when it holds none.

  For readers beside a run (the LoRA of a workdir: keys ("train", "lora")): only that subtree
  is read, onto one local device, whatever mesh wrote it, with no abstract tree to build (the
  shapes come from the checkpoint's metadata). Read-only: nothing is created, cleaned or moved,
  and a save in flight (a `*.orbax-checkpoint-tmp` folder) is not listed. Every process of a
  multi-process job must call it (orbax synchronises restores).
  """
  if not os.path.isdir(directory):
    return None
  steps = ocp.utils.checkpoint_steps(directory)  # finalized ones only
  if not steps:
    return None
  step = max(steps)
  path = os.path.join(directory, str(step), "state")
  # The handler's metadata, not PyTreeCheckpointer.metadata: that one also looks for the step's
  # _CHECKPOINT_METADATA inside the item's folder (it lives one level up) and logs a warning.
  node = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
  reader = ocp.PyTreeCheckpointer()
  for depth, key in enumerate(keys):
    if not isinstance(node, dict) or key not in node:
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise ValueError(f"{path}: the checkpoint has no {'/'.join(keys[:depth + 1])} (found "
                       f"{have}): not a training run's checkpoint?")
    node = node[key]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  nest = lambda value: functools.reduce(lambda tree, key: {key: tree}, reversed(keys), value)
  item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), node)
  restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=device), node)
  out = reader.restore(path, args=ocp.args.PyTreeRestore(
      item=nest(item), restore_args=nest(restore_args), partial_restore=True))
  for key in keys:
    out = out[key]
  return step, jax.tree.map(np.asarray, out)


def read_settings(directory: str, step: int) -> dict | None:
  """The settings saved with checkpoint `step` in `directory` (the run's config as config.json
  holds it); None for a checkpoint saved without them (before they were kept). Raises
  ValueError naming the file when it cannot be read."""
  path = os.path.join(directory, str(step), SETTINGS, "metadata")
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      settings = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: the settings of checkpoint step {step} cannot be read ({e})") \
        from None
  if not isinstance(settings, dict):
    raise ValueError(f"{path}: the settings of checkpoint step {step} are not a JSON object")
  return settings


def _json_ok(value) -> bool:
  try:
    json.dumps(value)
    return True
  except (TypeError, ValueError):
    return False


# --- preemption -------------------------------------------------------------------------------

class PreemptionHandler:
  """`should_stop(step)`: True once this run should save and exit at this step boundary.

  Single process: a Python SIGTERM handler sets a flag (nothing else: no I/O, no exit, no jax in
  a signal handler); the loop sees it at the next step, saves with `force=True`, waits, exits.

  Several processes: hosts receive SIGTERM at different times, and stopping on a local flag
  would leave some hosts in a collective save while others train on (deadlock). So there the
  answer comes from orbax's `reached_preemption(step)`, i.e. JAX's preemption sync service
  (`jax.distributed.initialize` installs its own SIGTERM notifier and agrees on one step for
  all hosts); pass the same `step` on every host, once per step. The local flag is then only
  informational. Orbax's CheckpointManager consults the same sync point in `save`, so an
  unforced save at that step is written too.
  """

  def __init__(self, signum: int = signal.SIGTERM):
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("install_preemption_handler must be called from the main thread "
                         "(Python only delivers signals there)")
    self.signum = signum
    self.received = False
    self._previous = signal.getsignal(signum)
    # None: a handler installed outside Python, e.g. JAX's preemption notifier. Replacing it
    # would hide the signal from the multi-host sync, so leave it and rely on `reached_preemption`.
    self._installed = self._previous is not None
    if self._installed:
      signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __call__(self, step: int | None = None) -> bool:
    if jax.process_count() > 1:
      if step is None:
        raise ValueError("should_stop(step): the step is required in multi-process runs, "
                         "where hosts agree on the stopping step")
      return bool(ocp.multihost.reached_preemption(int(step)))
    if self.received:
      return True
    return step is not None and bool(ocp.multihost.reached_preemption(int(step)))

  def uninstall(self) -> None:
    """Restores the handler that was in place before (idempotent)."""
    if self._installed:
      signal.signal(self.signum, self._previous)
      self._installed = False


def install_preemption_handler(signum: int = signal.SIGTERM) -> PreemptionHandler:
  """Installs the SIGTERM flag handler; returns `should_stop` (call `.uninstall()` when done).

      should_stop = install_preemption_handler()
      for step in ...:
        state = train_step(...)
        stop = should_stop(step)
        ckpt.save(step, state, meta, force=stop)
        if stop:
          break
      ckpt.wait(); should_stop.uninstall()
  """
  return PreemptionHandler(signum)


# --- LoRA export for diffusers ----------------------------------------------------------------

def remove_stale_temporaries(directory: str) -> list[str]:
  """Deletes the `*.orbax-checkpoint-tmp*` folders of saves that never finished (a run killed
  mid-save). Only for the run that holds the workdir (fnf_jax.runtime.runlock): no save is in flight.
  Returns the names removed."""
  if not os.path.isdir(directory):
    return []
  stale = sorted(n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n)
  for name in stale:
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  if stale:
    logging.info("removed unfinished checkpoint saves in %s: %s", directory, ", ".join(stale))
  return stale


def export_lora_safetensors(lora_tree: dict, path: str | os.PathLike, *, alpha: float,
                            rank: int, step: int | None = None) -> dict[str, tuple[int, ...]]:
  """Writes LoRA weights as a diffusers/peft `.safetensors` file; returns {key: shape}.

  Keys: `unet.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (torch layout:
  our `lora_a` [in, r] and `lora_b` [r, out] transposed), with Flax names mapped back to torch
  module paths by `convert.torch_key` (`down_blocks_0` -> `down_blocks.0`, `to_out_0` ->
  `to_out.0`), the rule of the diffusers folder export too.

  The update is W + (alpha / rank) · B·A. The file's metadata holds `alpha` and `rank`, and the
  `lora_adapter_metadata` JSON ({"unet.r", "unet.lora_alpha", "unet.target_modules"}) that
  diffusers (e.g. 0.42) turns into the peft LoraConfig, so the scale is applied automatically:

      pipe = StableDiffusionPipeline.from_pretrained(...)
      pipe.load_lora_weights("out_dir", weight_name="lora.safetensors")

  A diffusers too old to read `lora_adapter_metadata` assumes alpha = rank (scale 1); there,
  set the scale by hand: `pipe.set_adapters(["default_0"], adapter_weights=[alpha / rank])`
  (or `cross_attention_kwargs={"scale": alpha / rank}`). `fnf_jax.models.lora_io.load` reads
  it back (`Pipeline.generate(lora=path)`). Every process may call this; in a multi-host run
  only one should (all arrays are gathered to each caller).
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"export_lora_safetensors({path!s}): rank must be an int >= 1, got {rank!r}")
  tensors, modules = {}, []

  def visit(node, names):
    if not isinstance(node, dict):
      raise ValueError(f"LoRA tree at {'/'.join(names) or '<root>'}: expected nested dicts, "
                       f"got {type(node).__name__}")
    if "lora_a" in node or "lora_b" in node:
      where = "/".join(names)
      if set(node) != {"lora_a", "lora_b"}:
        raise ValueError(f"LoRA layer {where} must hold exactly 'lora_a' and 'lora_b', "
                         f"has {sorted(node)}")
      a, b = distributed.gather(node["lora_a"]), distributed.gather(node["lora_b"])
      if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
        raise ValueError(f"LoRA layer {where}: lora_a {a.shape} / lora_b {b.shape} are not "
                         f"[in, {rank}] / [{rank}, out] for rank={rank}")
      module = convert.torch_key(names)
      modules.append(module)
      tensors[f"unet.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
      tensors[f"unet.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
      return
    for name, child in node.items():
      visit(child, names + [str(name)])

  visit(lora_tree, [])
  if not tensors:
    raise ValueError(f"export_lora_safetensors({path!s}): the LoRA tree holds no layers")
  adapter = {"unet.r": rank, "unet.lora_alpha": float(alpha),
             "unet.target_modules": sorted(modules)}
  metadata = {"format": "pt", "alpha": str(float(alpha)), "rank": str(rank),
              "lora_adapter_metadata": json.dumps(adapter, sort_keys=True)}
  if step is not None:
    metadata["step"] = str(int(step))  # the training step these weights are from
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  convert.write_safetensors(str(path), tensors, metadata)
  return {k: tuple(v.shape) for k, v in tensors.items()}
