"""The reward trainer's pieces, shared by the train_reward and eval_reward jobs: the setup (mesh,
data, model, the heads they share), the batch layout, the loss, the step and the export.

The loss (RAHF's, per head the model and the dataset share):

    loss = loss.heatmap_weight · Σ_k mean((heatmap_k - map_k)²)
         + loss.score_weight   · Σ_k mean((score_k - score_k*)²)

(loss.heatmap = "bce" puts per-pixel binary cross-entropy in place of the heatmaps' squared
error: sparse maps then do not collapse to zero; the toy world's defect net trains so.)
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fnf_jax.config import validate
from fnf_jax.data import reward_data
from fnf_jax.data import reward_datasets
from fnf_jax.data import tfds_lib
from fnf_jax.rewards import trainable as trainable_lib
from fnf_jax.runtime import distributed
from fnf_jax.runtime import sharding

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
  rules = sharding.rules(config.sharding_rules)
  dataset = reward_datasets.get(config.data.name)
  kwargs = {"config": config.data.builder_config} if config.data.builder_config else {}
  builder, dropped = tfds_lib.prepare(
      reward_datasets.builder_class(dataset), data_dir=data_dir(config, workdir),
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
