"""The `sample` job: images for a prompt set and seeds, written as PNGs plus a JSON index;
with config.model.lora, of the UNet with that LoRA applied (read once, `lora_io.load`)."""

import json
import os

import jax
import numpy as np
from absl import logging
from PIL import Image

from fnf_jax.runtime import distributed
from fnf_jax.diffusion import pipeline
from fnf_jax.runtime import progress
from fnf_jax.config import validate
from fnf_jax.data import examples
from fnf_jax.data import prompts as prompts_lib
from fnf_jax.models import lora_io


def save_png(image: np.ndarray, path: str) -> None:
  """[H, W, 3] float in [0, 1] -> 8-bit PNG."""
  Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def load_lora(config, pipe) -> tuple[dict | None, float | None]:
  """(tree, scale) of config.model.lora, read once for every batch; (None, None) for ""."""
  if not config.model.lora:
    return None, None
  try:
    return lora_io.load(config.model.lora, pipe.params["unet"],
                        where=f"config.model.lora = {config.model.lora!r}")
  except ValueError as e:  # the file does not fit this model: the config's mistake
    raise validate.ConfigError(str(e)) from None


def run(config, workdir: str) -> list[dict]:
  """The job (its config validated by fnf_jax.config.validate.sample_job).

  With several processes each generates every P-th batch on its own devices and writes those
  images; process 0 writes the index once all are written.
  """
  distributed.initialize(config.distributed)
  pipe = pipeline.load(config.model.path, dtype=config.model.dtype,
                       attention_impl=config.model.attention)
  lora, lora_scale = load_lora(config, pipe)
  prompts, _ = prompts_lib.load(config.prompts, split=config.prompts.split,
                                limits=examples.prompt_limits(pipe))
  jobs = [(p, seed) for p in prompts for seed in config.seeds]
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  records = [{"file": f"{i:05d}_seed{seed}.png", "prompt": prompt, "seed": seed}
             for i, (prompt, seed) in enumerate(jobs)]
  bar = progress.Progress(len(jobs), label="sample")
  starts = range(0, len(jobs), config.batch_size)
  for start in starts[jax.process_index()::jax.process_count()]:
    chunk = jobs[start:start + config.batch_size]
    # One seed per image: each image's x_T depends on its own seed only, not on the batching.
    latents = np.stack([examples.initial_noise(seed, pipe.latent_shape) for _, seed in chunk])
    images = pipe.generate([p for p, _ in chunk], latents=latents,
                           num_inference_steps=config.sampling.num_steps,
                           guidance_scale=config.sampling.guidance_scale,
                           negative_prompt=config.sampling.negative_prompt,
                           lora=lora, lora_scale=lora_scale)
    for record, image in zip(records[start:start + len(chunk)], images):
      save_png(image, os.path.join(out_dir, record["file"]))
    bar.update(len(chunk))
  distributed.barrier("samples-written")
  meta = {"model": config.model.path, "num_steps": config.sampling.num_steps,
          "guidance_scale": config.sampling.guidance_scale,
          "negative_prompt": config.sampling.negative_prompt, "lora": config.model.lora,
          "lora_scale": lora_scale, "images": records}
  if distributed.is_writer():
    with open(os.path.join(out_dir, "samples.json"), "w") as f:
      json.dump(meta, f, indent=1)
  logging.info("wrote %d images to %s", len(records), out_dir)
  return records

