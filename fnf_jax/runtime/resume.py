"""The run record: what a resumed run may change, and the history of those changes.

A run keeps its config in WORKDIR/config.json. Run again on a workdir that holds checkpoints, it
compares its config with that record before anything is loaded or overwritten:
- changes that a resume can honour are applied and listed (the learning rate and Adam's
  constants are set in the restored optimizer state, the step count, logging, checkpointing,
  the layout on the devices, the memory settings);
- any other change (model, LoRA, prompts, mask, sampling, objective, reward, seed, batch...)
  would make the checkpoint mean something else: the run refuses, naming every differing key
  with both values, and writes nothing.
Each accepted change is appended to WORKDIR/config_history.jsonl (time, step, key: [old, new]).
Only process 0 writes.
"""

import json
import os
import time

from fnf_jax.runtime import log as metrics
from fnf_jax.config import validate

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


def has_checkpoints(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))


def check_resume(config, workdir: str) -> dict:
  """The accepted changes against the recorded config ({} for a new run); raises
  validate.ConfigError naming the keys a resume cannot change."""
  path = os.path.join(workdir, CONFIG)
  if not has_checkpoints(workdir) or not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise validate.ConfigError(f"{path}: the run record cannot be read ({e}); the workdir holds "
                               "checkpoints of a run whose settings are unknown. Use a fresh "
                               "workdir, or restore that file") from None
  now = as_json(config)
  # Only the added keys this config has (the reward-training configs have none of them).
  added = {k: v for k, v in ADDED.items() if k in flatten(now)}
  changes = differences({**added, **flatten(recorded)}, now)
  unsafe = {k: v for k, v in changes.items() if not _safe(k)}
  if unsafe:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
    raise validate.ConfigError(
        f"{workdir} holds checkpoints of a run with other settings, which a resume cannot "
        f"change: {listed}. Nothing was overwritten. Rerun with the recorded values "
        f"({path}), or use a fresh workdir for a new run. A resume may change: "
        + ", ".join(SAFE))
  return changes


def write(config, workdir: str, changes: dict, step: int | None) -> None:
  """config.json (the settings now in force) and, for a resume with changes, a history line.
  Process 0 only (the caller checks)."""
  os.makedirs(workdir, exist_ok=True)
  if changes:
    with open(os.path.join(workdir, HISTORY), "a", encoding="utf-8") as f:
      f.write(json.dumps({"time": round(time.time(), 3), "step": step,
                          "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
  metrics.write_config(workdir, config)
