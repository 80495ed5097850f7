"""The run record: what a resumed run may change, and the history of those changes.

Every checkpoint holds the settings its weights were trained with (the config as config.json
holds it, item `settings` of fnf_jax/runtime/checkpoint.py), and a run keeps the settings now
in force in WORKDIR/config.json. Run again on a workdir that holds checkpoints, it compares its
config with the settings saved with each checkpoint before anything is loaded or overwritten,
whether or not config.json is there (a checkpoint saved before settings were kept is compared
with config.json; with neither, the run refuses):
- changes that a resume can honour are applied and listed (the learning rate and Adam's
  constants are set in the restored optimizer state, the step count, logging, checkpointing,
  the layout on the devices, the memory settings);
- any other change (model, LoRA, prompts, mask, sampling, objective, reward, seed, batch...)
  would make the checkpoint mean something else: the run refuses, naming every differing key
  with both values, and writes nothing.
A config.json that is missing, unreadable, or disagrees with the newest checkpoint's settings
(edited, or copied from another run) is reported and written again; the checkpoints decide.
Each accepted change is appended to WORKDIR/config_history.jsonl (time, step, key: [old, new]).
Only process 0 writes.
"""

import json
import os
import time

from absl import logging

from fnf_jax.config import validate
from fnf_jax.runtime import checkpoint
from fnf_jax.runtime import log as metrics

CONFIG = "config.json"
HISTORY = "config_history.jsonl"

# Keys (or key prefixes, ending in ".") a resume may change.
SAFE = ("job", "optim.lr", "optim.b1", "optim.b2", "optim.weight_decay", "optim.grad_clip",
        "optim.schedule", "optim.warmup_steps", "optim.decay_steps", "train.num_steps", "log.",
        "checkpoint.", "data.prefetch", "data.workers", "eval.", "mesh.", "sharding_rules",
        "distributed.", "cache.", "compile.", "model.attention", "model.unet_remat", "model.vae_remat",
        "model.lora")  # read by the sampling jobs only, never by training

# Keys added after runs may have been recorded, with the value that means what those runs did: a
# record without one is read as holding it (else every older run would refuse to resume).
ADDED = {"lora.init": "", "model.lora": "", "prompts.data_dir": ""}


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def as_json(config) -> dict:
  """The config as config.json holds it (tuples become lists)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=repr))


def _safe(key: str) -> bool:
  return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE)


def differences(old: dict, new: dict) -> dict:
  """{dotted key: (old, new)} of the keys whose values differ (missing = None)."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _steps(workdir: str) -> list[int]:
  """The complete checkpoints' steps (a save in flight or killed is a `*.orbax-checkpoint-tmp*`
  folder, not listed)."""
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) \
      else []


def has_checkpoints(workdir: str) -> bool:
  return bool(_steps(workdir))


def _record(path: str) -> tuple[dict | None, str]:
  """(config.json's settings or None, why not: "" | "missing" | the read error)."""
  if not os.path.isfile(path):
    return None, "missing"
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    return None, f"unreadable ({e})"
  return (recorded, "") if isinstance(recorded, dict) else (None, "not a JSON object")


def _saved(workdir: str, steps: list[int]) -> dict[int, dict | None]:
  """{step: the settings saved with it, or None (saved before settings were kept)}."""
  folder = os.path.join(workdir, "checkpoints")
  out = {}
  for step in steps:
    try:
      out[step] = checkpoint.read_settings(folder, step)
    except ValueError as e:
      raise validate.ConfigError(
          f"{e}: the run's settings at that step are unknown. Move {folder}/{step} aside (the "
          "resume then starts from the checkpoint before it), or use a fresh workdir") from None
  return out


def _sources(workdir: str, steps: list[int], added: dict) -> list[tuple[str, dict]]:
  """[(what it is, flat settings)] to check a resume against: each checkpoint's saved
  settings, newest first, and config.json for the checkpoints saved without them."""
  path = os.path.join(workdir, CONFIG)
  saved = _saved(workdir, steps)
  recorded, problem = _record(path)
  sources = [(f"the settings saved with checkpoint step {s}", {**added, **flatten(saved[s])})
             for s in reversed(steps) if saved[s] is not None]
  legacy = [s for s in steps if saved[s] is None]
  if legacy and recorded is None:
    raise validate.ConfigError(
        f"{path} is {problem}, and checkpoint step(s) {legacy} in {workdir}/checkpoints were "
        "saved without their settings: the settings of the run they belong to are unknown. "
        "Use a fresh workdir, or restore that file")
  if legacy:
    sources.append((f"the run record {path}", {**added, **flatten(recorded)}))
  elif recorded is None:
    logging.warning("%s is %s: the resume is checked against the settings saved with "
                    "checkpoint step %d, and the file is written again", path, problem,
                    steps[-1])
  else:
    edited = [k for k in differences(sources[0][1], {**added, **flatten(recorded)})
              if not _safe(k)]
    if edited:
      logging.warning("%s disagrees with the settings saved with checkpoint step %d (%s): "
                      "edited, or from another run? The checkpoint's settings are what the "
                      "resume is checked against; the file is written again", path, steps[-1],
                      ", ".join(edited))
  return sources


def check_resume(config, workdir: str) -> dict:
  """The accepted changes against the settings of the newest checkpoint ({} for a new run);
  raises validate.ConfigError naming the keys a resume cannot change (module docstring)."""
  steps = _steps(workdir)
  if not steps:
    return {}
  now = as_json(config)
  # Only the added keys this config has (the reward-training configs have none of them).
  added = {k: v for k, v in ADDED.items() if k in flatten(now)}
  sources = _sources(workdir, steps, added)
  unsafe, where = {}, []
  for name, settings in sources:
    found = {k: v for k, v in differences(settings, now).items()
             if not _safe(k) and k not in unsafe}
    if found:
      unsafe.update(found)
      where.append(name)
  if unsafe:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
    raise validate.ConfigError(
        f"{workdir} holds checkpoints of a run with other settings ({', '.join(where)}), which "
        f"a resume cannot change: {listed}. Nothing was overwritten. Rerun with the saved "
        "values, or use a fresh workdir for a new run. A resume may change: " + ", ".join(SAFE))
  return differences(sources[0][1], now)


def write(config, workdir: str, changes: dict, step: int | None) -> None:
  """config.json (the settings now in force) and, for a resume with changes, a history line.
  Process 0 only (the caller checks)."""
  os.makedirs(workdir, exist_ok=True)
  if changes:
    with open(os.path.join(workdir, HISTORY), "a", encoding="utf-8") as f:
      f.write(json.dumps({"time": round(time.time(), 3), "step": step,
                          "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
  metrics.write_config(workdir, config)
