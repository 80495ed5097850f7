"""Generate images from a diffusers-format Stable Diffusion checkpoint.

    python -m fnf_jax.main --config=configs/sample.py --workdir=/tmp/samples \
        --config.model.path=/models/stable-diffusion-v1-5

Prompts from a file instead of the list below:

    ... --config.prompts.source=text --config.prompts.path=prompts.txt

With a fine-tuned LoRA (a training run's workdir, or a LoRA file):

    ... --config.model.lora=/runs/violence

Writes WORKDIR/samples/*.png and WORKDIR/samples/samples.json (prompt and seed of each image).

On a CPU, without a download (the shipped toy model, 12 images in about 15 s):

    python -m fnf_jax.main --config=configs/sample.py:runlocal --workdir=/tmp/samples
"""

import os
import sys

import ml_collections

from fnf_jax import assets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import focus_n_fix  # noqa: E402  (the shared distributed block)


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  config.job = "sample"
  # Several processes split the batches (focus_n_fix.distributed_config documents the fields).
  config.distributed = focus_n_fix.distributed_config()
  config.compile = focus_n_fix.compile_config()  # the persistent compilation cache, XLA flags

  config.model = ml_collections.ConfigDict()
  config.model.path = ""  # diffusers-format folder (model_index.json, unet/, vae/, ...). Required.
  config.model.dtype = "float32"  # compute dtype: float32 or bfloat16.
  # The attention kernel per layer: auto (cuDNN on NVIDIA GPUs, Pallas splash on TPUs, chunked
  # or plain XLA elsewhere) | xla | chunked | cudnn | splash. fnf_jax/models/attention/choice.py.
  config.model.attention = "auto"
  # A LoRA applied to the UNet: a .safetensors file (ours, diffusers' / peft's) or a training
  # run's workdir (its newest checkpoint); "" = the base model. fnf_jax/models/lora_io.py.
  config.model.lora = ""

  config.prompts = ml_collections.ConfigDict()
  config.prompts.source = "list"  # list | text | parti | i2p (see fnf_jax/data/prompts.py).
  config.prompts.texts = ("a photograph of an astronaut riding a horse",)  # for source=list.
  config.prompts.path = ""  # file for text / parti / i2p.
  config.prompts.data_dir = ""  # parti / i2p: where TFDS builds them; "" = a temporary folder.
  config.prompts.categories = ()  # parti: Category values; i2p: categories to keep. () = all.
  config.prompts.eval_fraction = 0.0  # share held out as eval (hash of the prompt text).
  config.prompts.split = "all"  # train | eval | all.

  config.seeds = (0,)  # one image per prompt and seed; x_T comes from the seed alone.
  config.batch_size = 4  # images per generate() call.

  config.sampling = ml_collections.ConfigDict()
  config.sampling.num_steps = 50  # DDIM steps.
  config.sampling.guidance_scale = 7.5  # classifier-free guidance; <= 1 disables it.
  config.sampling.negative_prompt = ""

  if arg == "runlocal":  # the toy world's model (configs/toy.py), its captions
    config.model.path = assets.path("toy_pipeline")
    config.prompts.texts = tuple(f"a {c} {s}" for c in ("red", "green", "blue", "yellow")
                                 for s in ("circle", "square", "triangle"))
    config.batch_size = 12
    config.sampling.num_steps = 20
    config.sampling.guidance_scale = 3.0
  elif arg is not None:
    raise ValueError(f"unknown config argument {arg!r}; valid: 'runlocal' (or none)")
  return config
