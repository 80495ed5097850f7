"""The `pretrain` job: trains the toy world's latent diffusion model from scratch and exports it.

    python -m fnf_jax.main --config=configs/toy_pretrain.py --workdir=/tmp/toy_pretrain

Three stages, in this order. Each is a step function run by the shared training loop
(fnf_jax/runtime/loop.py) in its own folder, WORKDIR/<stage>/: Orbax checkpoints every
`checkpoint.every` steps, at the end and on SIGTERM (WORKDIR/<stage>/checkpoints), metrics.jsonl
and TensorBoard there too. A stopped stage resumes from its newest checkpoint; a stage whose
output is in WORKDIR is skipped.
  1. vae     the KL autoencoder on toy images: L1 reconstruction (blotch pixels weighted up) +
             a small KL term. Its scaling factor is then set to 1 / std of the encoder's latents
             (SD's rule), and the stage stops the job if the judge finds the defect in too few
             reconstructions of defective images: a VAE that paints the blotch away would leave
             nothing for fine-tuning to fix. Output: WORKDIR/vae.msgpack, vae_report.json.
  2. reward  the `toy_defect` localized reward model (reward.py), on the world's ground-truth
             defect masks. Output: WORKDIR/toy_defect.safetensors, reward_report.json.
  3. unet    the UNet and the CLIP text encoder together, DDPM ε-prediction on the VAE's
             posterior samples, 10% of captions dropped to "" (what classifier-free guidance's
             unconditional branch is fed), EMA weights for sampling.
The EMA model is exported every `export_every` steps and at the end as a diffusers-format
folder, WORKDIR/pipeline (`fnf_jax.models.export`), with a sample grid and the judge's colour /
shape / defect rates (a row of WORKDIR/sample_report.jsonl; the final step's row marks the stage
done). Every batch and random draw is a function of the step: a resumed stage ends where an
uninterrupted one does.
"""

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fnf_jax.diffusion import random_models
from fnf_jax.diffusion import schedulers
from fnf_jax.models import export
from fnf_jax.models import vae as vae_lib
from fnf_jax.runtime import distributed
from fnf_jax.runtime import loop as loop_lib
from fnf_jax.runtime import runlock
from fnf_jax.toy import judge
from fnf_jax.toy import models
from fnf_jax.toy import reward as toy_defect
from fnf_jax.toy import world


def images_batch(step: int, batch_size: int, cfg, defect_rate: float | None = None,
                 offset: int = 0) -> dict:
  """Training images for `step`: world indices offset + step * batch_size + i (never the eval
  indices, which `eval_indices` takes from the other end of the index space)."""
  start = offset + step * batch_size
  return world.batch(range(start, start + batch_size), seed=cfg.data_seed,
                     defect_rate=cfg.defect_rate if defect_rate is None else defect_rate)


def eval_indices(n: int) -> range:
  return range(10**9, 10**9 + n)


def _adamw(cfg):
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps,
                                                cfg.lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.99, weight_decay=cfg.weight_decay))


def _encode_sample(vae, vae_params, images, rng) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(z, mean, logvar): a posterior draw (unscaled latents) for images [B, H, W, 3] in [0, 1]."""
  mean, logvar = vae.apply({"params": vae_params}, images * 2 - 1, method=vae.encode)
  return vae_lib.sample_posterior(mean, logvar, rng), mean, logvar


def _save(path: str, tree) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, tree)))
  os.replace(tmp, path)


def _load(path: str):
  with open(path, "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def _fit(config, workdir: str, name: str, state, step_fn, batch_at, *, every: int = 0,
         hook=None):
  """Runs stage `name` (config.<name>.steps steps of `step_fn`) under the shared loop in
  WORKDIR/<name>, from its newest checkpoint if it has one; returns the final state (the
  restored one when the stage's checkpoints already reach its last step).

  `batch_at(step)` is the step's host batch, `step_fn(state, host, step)` returns (state,
  device metrics); `hook(state, step)` runs every `every` steps. Raises `loop.Preempted` on
  SIGTERM, after saving.
  """
  stage, folder = config[name], os.path.join(workdir, name)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        {"train": state})
  # No resume check (resume.check_resume): as before the shared loop, a rerun's config applies.
  start = loop_lib.restore(folder, config.checkpoint, target, changes={}, config=config)
  if start.restored is not None:
    state = start.restored["train"]
    logging.info("%s: resuming from checkpoint step %d in %s", name, start.step,
                 start.checkpointer.directory)
  if start.step >= stage.steps:
    start.checkpointer.close()
    logging.info("%s: checkpoint step %d of %d: nothing to train", name, start.step, stage.steps)
    return state
  logging.info("%s: steps %d..%d (logs and checkpoints in %s)", name, start.step + 1,
               stage.steps, folder)
  loop = loop_lib.Loop(
      workdir=folder, num_steps=stage.steps, batch_size=stage.batch_size,
      log_every=config.log.every, tensorboard=config.log.tensorboard, image_every=every,
      panels=None if hook is None else lambda writer, state, batch, step: hook(state, step),
      guard_message=f"lower {name}.lr before resuming (or delete {folder} to start the "
                    "stage over)")
  hosts = (batch_at(i) for i in range(start.step, stage.steps))
  step3 = lambda state, host, step: (*step_fn(state, host, step), None)
  state, _ = loop_lib.run(loop, state, start.step, start.checkpointer, hosts, step3)
  return state


def _on_masks(step, rng):
  """The `_fit` step of a jitted step(state, images, defect masks, key): the key is the step's."""
  return lambda state, host, i: step(state, jnp.asarray(host["image"]),
                                     jnp.asarray(host["defect_mask"], jnp.float32),
                                     jax.random.fold_in(rng, i))


# --- stage 1: the VAE --------------------------------------------------------------------------
def make_vae_step(cfg, vae, opt):
  """The jitted step on {"params", "opt_state"}: L1 (blotch pixels weighted up) + KL."""

  def step(state, images, defect, rng):
    def loss_fn(p):
      x = images * 2 - 1
      z, mean, logvar = _encode_sample(vae, p, images, rng)
      rec = vae.apply({"params": p}, z, method=vae.decode)
      # Blotch pixels weigh more: they are ~0.5% of all pixels, and a plain L1 autoencoder of
      # this size paints them over with the shape's colour (judge recall 2% after 1500 steps).
      weight = 1.0 + cfg.vae.defect_weight * defect[..., None]
      l1 = jnp.mean(weight * jnp.abs(rec - x))
      kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
      return l1 + cfg.vae.kl_weight * kl, (l1, kl)
    params = state["params"]
    (loss, (l1, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, state["opt_state"], params)
    return ({"params": optax.apply_updates(params, updates), "opt_state": opt_state},
            {"loss": loss, "l1": l1, "kl": kl})

  return jax.jit(step)


def train_vae(cfg, workdir: str) -> tuple[dict, float]:
  """(vae params, scaling factor), trained or read back from `workdir/vae.msgpack`."""
  path = os.path.join(workdir, "vae.msgpack")
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(models.vae_config()))
  if os.path.exists(path):
    saved = _load(path)
    logging.info("vae: read %s (scaling factor %.4f)", path, saved["scaling_factor"])
    return saved["params"], float(saved["scaling_factor"])

  abstract = jax.eval_shape(vae.init, jax.random.key(0), vae_lib.dummy_images(vae.config))
  params = jax.tree.map(jnp.asarray, random_models.init_params(abstract["params"], cfg.seed))
  opt = _adamw(cfg.vae)
  step_fn = _on_masks(make_vae_step(cfg, vae, opt), jax.random.key(cfg.seed))

  def report_at(state, i):
    if i < cfg.vae.steps:  # the last step's report follows the training
      logging.info("vae step %d: %s", i, json.dumps(vae_report(vae, state["params"], cfg)))

  state = _fit(cfg, workdir, "vae", {"params": params, "opt_state": opt.init(params)}, step_fn,
               lambda i: images_batch(i, cfg.vae.batch_size, cfg,
                                      defect_rate=cfg.vae.defect_rate),
               every=cfg.vae.report_every, hook=report_at)
  params = state["params"]
  report = vae_report(vae, params, cfg)
  logging.info("vae: %s", json.dumps(report))
  if report["defect_recall"] < cfg.vae.min_defect_recall:
    raise RuntimeError(
        f"the VAE keeps the defect in only {report['defect_recall']:.1%} of reconstructions "
        f"(vae.min_defect_recall = {cfg.vae.min_defect_recall}): a diffusion model on its "
        "latents could not draw it. Train longer (vae.steps) or weigh it more "
        f"(vae.defect_weight), after deleting {os.path.join(workdir, 'vae')} (its checkpoints "
        "are of this training).")
  _save(path, {"params": params, "scaling_factor": report["scaling_factor"]})
  with open(os.path.join(workdir, "vae_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return params, report["scaling_factor"]


def vae_report(vae, params, cfg, n: int = 512) -> dict:
  """Scaling factor, reconstruction L1 and the judge's defect recall / false positives on
  reconstructions of held-out images (posterior means)."""
  data = world.batch(eval_indices(n), seed=cfg.data_seed, defect_rate=0.5)
  x = jnp.asarray(data["image"]) * 2 - 1
  mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, x)
  rec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, mean)
  rec = np.clip(np.asarray(rec) / 2 + 0.5, 0, 1)
  found = judge.defects(rec)["has_defect"]
  truth = np.asarray(data["has_defect"])
  colors = np.array(judge.color(rec)) == np.array(data["color"])
  return {"scaling_factor": models.latent_scaling_factor(mean),
          "l1": float(np.mean(np.abs(rec - np.asarray(data["image"])))),
          "defect_recall": float(found[truth].mean()),
          "defect_false_positive_rate": float(found[~truth].mean()),
          "color_right": float(colors.mean()), "images": n}


# --- stage 2: the localized reward model ------------------------------------------------------
def make_reward_step(opt, reconstruct):
  """The jitted step on {"params", "opt_state"}: per-pixel BCE on images and reconstructions."""

  def step(state, images, target, rng):
    images = jnp.concatenate([images, reconstruct(images, rng)])
    target = jnp.concatenate([target, target])

    def loss_fn(p):
      logits = toy_defect.DefectNet().apply({"params": p}, images)
      return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state},
            {"loss": loss})

  return jax.jit(step)


def train_reward(cfg, workdir: str, vae_params: dict) -> dict:
  """`toy_defect` weights (WORKDIR/toy_defect.safetensors): per-pixel BCE against the world's
  defect masks, on clean images and on their VAE reconstructions alike (samples of the diffusion
  model look like the latter: softer edges, lighter blotches)."""
  path = os.path.join(workdir, "toy_defect.safetensors")
  if os.path.exists(path):
    logging.info("reward: read %s", path)
    return toy_defect.load(path)
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(models.vae_config()))
  params = toy_defect.init(cfg.seed + 3)
  opt = _adamw(cfg.reward)

  def reconstruct(images, rng):
    z, _, _ = _encode_sample(vae, vae_params, images, rng)
    return jnp.clip(vae.apply({"params": vae_params}, z, method=vae.decode) / 2 + 0.5, 0, 1)

  step_fn = _on_masks(make_reward_step(opt, reconstruct), jax.random.key(cfg.seed + 4))
  # Its own slice of the world's training indices, half of them with a blotch.
  state = _fit(cfg, workdir, "reward", {"params": params, "opt_state": opt.init(params)},
               step_fn, lambda i: images_batch(i, cfg.reward.batch_size, cfg, defect_rate=0.5,
                                               offset=10**8))
  params = state["params"]
  toy_defect.save(params, path)
  report = reward_report(params, cfg, reconstruct)
  logging.info("reward: %s", json.dumps(report))
  with open(os.path.join(workdir, "reward_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  return params


def reward_report(params, cfg, reconstruct, n: int = 512) -> dict:
  """Per-pixel IoU of heatmap > 0.5 with the true masks, and the score's separation of
  defective from clean images, on held-out images and their reconstructions."""
  data = world.batch(eval_indices(n), seed=cfg.data_seed, defect_rate=0.5)
  truth, has = np.asarray(data["defect_mask"]), np.asarray(data["has_defect"])
  out = {}
  for name, images in (("data", jnp.asarray(data["image"])),
                       ("reconstructions", jax.jit(reconstruct)(jnp.asarray(data["image"]),
                                                                jax.random.key(0)))):
    heat = np.asarray(jax.jit(toy_defect.heatmap)(params, images)) > 0.5
    score = np.asarray(jax.jit(toy_defect.score)(params, images))
    out[name] = {"iou": float((heat & truth).sum() / max((heat | truth).sum(), 1)),
                 "score_defective": float(score[has].mean()),
                 "score_clean": float(score[~has].mean())}
  return out


# --- stage 3: the UNet and the text encoder ----------------------------------------------------
def make_unet_step(cfg, pipe, opt):
  """The jitted ε-prediction step on {"unet", "text_encoder"} params (+ EMA), through the same
  Pipeline.encode_prompts / unet_model that sampling and fine-tuning use."""
  sched = pipe.scheduler

  def step(state, images, ids, rng):
    k_post, k_t, k_noise = jax.random.split(rng, 3)
    z, _, _ = _encode_sample(pipe.vae, pipe.params["vae"], images, k_post)
    x0 = vae_lib.to_latents(z, pipe.vae.config)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, sched.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape)
    xt = schedulers.add_noise(sched, x0, noise, t)

    def loss_fn(p):
      cond = pipe.encode_prompts(p, ids[None])
      return jnp.mean((pipe.unet_model(p["unet"])(xt, t, cond) - noise) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: cfg.unet.ema_decay * e + (1 - cfg.unet.ema_decay) * p,
                       state["ema"], params)
    return {"params": params, "opt_state": opt_state, "ema": ema,
            "step": state["step"] + 1}, {"loss": loss}

  return jax.jit(step, donate_argnums=0)


def _export(folder: str, pipe, params: dict, tok_dir: str, scaling_factor: float) -> str:
  return export.export_pipeline(
      folder, unet_config=models.unet_config(), unet_params=params["unet"],
      vae_config=models.vae_config(scaling_factor), vae_params=pipe.params["vae"],
      text_config=models.text_config(), text_params=params["text_encoder"],
      tokenizer_dir=tok_dir, scheduler_config=models.scheduler_config(), overwrite=True)


def _exported_step(workdir: str) -> int | None:
  """The step of the newest export that was sampled and judged (sample_report.jsonl), or None."""
  path = os.path.join(workdir, "sample_report.jsonl")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f if line.strip()]
  return steps[-1] if steps else None


def train_unet(cfg, workdir: str, vae_params: dict, scaling_factor: float) -> None:
  """Trains the UNet and text encoder (skipped when the last step's export was judged)."""
  if _exported_step(workdir) == cfg.unet.steps:
    logging.info("unet: step %d is exported in %s", cfg.unet.steps,
                 os.path.join(workdir, "pipeline"))
    return
  tok_dir = models.write_tokenizer(os.path.join(workdir, "tokenizer"))
  pipe = models.build_pipeline(tok_dir, seed=cfg.seed + 1, vae_scaling_factor=scaling_factor)
  pipe = dataclasses.replace(pipe, params={**pipe.params, "vae": vae_params})
  opt = _adamw(cfg.unet)
  params = {k: jax.tree.map(jnp.asarray, pipe.params[k]) for k in ("unet", "text_encoder")}
  state = {"params": params, "opt_state": opt.init(params),
           "ema": jax.tree.map(jnp.copy, params),  # its own buffers: the step donates state
           "step": jnp.zeros((), jnp.int32)}
  step = make_unet_step(cfg, pipe, opt)
  tokenizer = pipe.tokenizers[0]
  rng = jax.random.key(cfg.seed + 2)

  def batch_at(i):
    data = images_batch(i, cfg.unet.batch_size, cfg)
    drop = np.random.default_rng([cfg.seed, 7, i]).uniform(size=len(data["caption"]))
    captions = [c if u >= cfg.unet.caption_dropout else "" for c, u in zip(data["caption"], drop)]
    return {"image": data["image"], "ids": tokenizer(captions)}

  def step_fn(state, host, i):
    return step(state, jnp.asarray(host["image"]), jnp.asarray(host["ids"]),
                jax.random.fold_in(rng, i))

  def export_at(state, i):
    folder = _export(os.path.join(workdir, "pipeline"), pipe, state["ema"], tok_dir,
                     scaling_factor)
    logging.info("unet step %d: exported %s; %s", i, folder,
                 json.dumps(sample_report(folder, cfg, step=i)))

  # The last step's export follows the training: also when a stop came between the two.
  state = _fit(cfg, workdir, "unet", state, step_fn, batch_at, every=cfg.export_every,
               hook=lambda state, i: export_at(state, i) if i < cfg.unet.steps else None)
  export_at(state, cfg.unet.steps)


def sample_report(folder: str, cfg, *, step: int) -> dict:
  """Samples every caption `cfg.eval.seeds` times from the exported folder; the judge's rates."""
  from fnf_jax.diffusion import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
  pipe = pipeline_lib.load(folder)
  prompts = [c for c in world.captions() for _ in range(cfg.eval.seeds)]
  images = []
  for s in range(0, len(prompts), cfg.eval.batch_size):
    images.append(pipe.generate(prompts[s:s + cfg.eval.batch_size], seed=s,
                                num_inference_steps=cfg.eval.num_steps,
                                guidance_scale=cfg.eval.guidance_scale))
  images = np.concatenate(images)
  verdict = judge.evaluate(images, prompts)
  # Columns: the 12 captions; rows: their first (up to) 4 seeds.
  shown = images.reshape(len(world.captions()), cfg.eval.seeds, *images.shape[1:])[:, :4]
  world.save_grid(os.path.join(folder, "..", f"samples_{step:06d}.png"),
                  shown.swapaxes(0, 1).reshape(-1, *images.shape[1:]), cols=12)
  report = {"step": step, "images": len(images),
            "color_right": float(verdict["color_right"].mean()),
            "shape_right": float(verdict["shape_right"].mean()),
            "prompt_fidelity": float(verdict["fidelity"].mean()),
            "defect_rate": float(verdict["has_defect"].mean())}
  with open(os.path.join(folder, "..", "sample_report.jsonl"), "a") as f:
    f.write(json.dumps(report) + "\n")
  return report


def run(config, workdir: str) -> None:
  """The `pretrain` job: the three stages (each skipped when its output is in WORKDIR, else
  resumed from its checkpoints in WORKDIR/<stage>)."""
  with runlock.hold(workdir, distributed.is_writer()):
    vae_params, scaling_factor = train_vae(config, workdir)
    train_reward(config, workdir, vae_params)
    train_unet(config, workdir, vae_params, scaling_factor)
