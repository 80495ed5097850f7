"""Config checks of the toy world's jobs (see fnf_jax/config/validate.py): `demo` (configs/toy.py) and
`pretrain` (configs/toy_pretrain.py). Light: no jax."""

from fnf_jax.config import validate as v
from fnf_jax.toy import methods


def demo(config) -> None:
  """Both methods' training configs (the first with its block `eval`, as the eval job's)."""
  v.training(config)
  try:
    draft = methods.method_config(config, "draft")
    v.training(draft)
  except KeyError as e:
    raise v.ConfigError(e.args[0]) from None
  except v.ConfigError as e:
    raise v.ConfigError(f"the DRaFT run (config.draft applied): {e}") from None


def _stage(config, stage: str) -> None:
  v.integer(config, f"{stage}.steps", 1)
  v.integer(config, f"{stage}.batch_size", 1)
  v.number(config, f"{stage}.lr", 0.0, open_low=True)
  v.integer(config, f"{stage}.warmup_steps", 0)
  v.number(config, f"{stage}.weight_decay", 0.0)


def pretrain(config) -> None:
  v.compile_block(config)
  for key in ("seed", "data_seed"):
    v.integer(config, key, 0)
  for key in ("export_every", "checkpoint.every", "checkpoint.keep", "log.every"):
    v.integer(config, key, 1)
  v.boolean(config, "log.tensorboard")
  v.number(config, "defect_rate", 0.0, 1.0)
  for stage in ("vae", "reward", "unet"):
    _stage(config, stage)
  v.number(config, "vae.kl_weight", 0.0)
  v.number(config, "vae.defect_weight", 0.0)
  v.number(config, "vae.defect_rate", 0.0, 1.0)
  v.integer(config, "vae.report_every", 1)
  v.number(config, "vae.min_defect_recall", 0.0, 1.0)
  v.number(config, "unet.caption_dropout", 0.0, 1.0)
  v.number(config, "unet.ema_decay", 0.0, 1.0, open_high=True)
  v.integer(config, "eval.seeds", 1)
  v.integer(config, "eval.batch_size", 1)
  v.integer(config, "eval.num_steps", 1)
  v.number(config, "eval.guidance_scale", 0.0)
