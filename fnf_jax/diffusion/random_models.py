"""Random-weight Stable-Diffusion-shaped pipelines, built in memory, for wiring runs,
benchmarks and tests.

`:runlocal` configs (`model.path = "tiny"`) run the whole training loop (checkpoints included) on
a laptop CPU with the TINY_* shapes: same modules, same code paths, minutes instead of hours.
Benchmarks build SD 1.5's shapes (SD15_*) where no checkpoint is at hand, and the toy world builds
its own model family through `build_pipeline`. The weights are random, so images mean nothing.
"""

import dataclasses
import tempfile
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fnf_jax.diffusion import pipeline as pipeline_lib
from fnf_jax.diffusion import schedulers
from fnf_jax.models import clip
from fnf_jax.models import clip_tokenizer
from fnf_jax.models import clip_vocab
from fnf_jax.models import unet as unet_lib
from fnf_jax.models import vae as vae_lib

# The wiring-run shapes: 64x64 images, 8x8 latents.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                 layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                 attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
                layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)

# Stable Diffusion 1.5's shapes (unet/, vae/, text_encoder/ config.json), for benchmarks with
# random weights where no checkpoint is at hand.
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, norm_num_groups=32,
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12)
# Stable Diffusion XL base 1.0's shapes (its VAE has SD's shapes, scaling 0.13025).
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), norm_num_groups=32,
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))
SDXL_VAE = dict(SD15_VAE, scaling_factor=0.13025)
SDXL_TEXT = dict(SD15_TEXT)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, projection_dim=1280, hidden_act="gelu")


def init_params(abstract: Any, seed) -> dict:
  """Fresh numpy params for an abstract (eval_shape) params tree: kernels N(0, 1/fan_in) (flax's
  lecun_normal, PyTorch's scale), norm scales 1, biases 0, embeddings N(0, 0.02) (CLIP's).

  Only the shapes come from flax: compiling flax's own init costs as much as compiling a forward
  pass (about a minute for the toy UNet on two CPU cores); this takes milliseconds.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(nn.meta.unbox(abstract)).items():
    shape, name = tuple(leaf.shape), path[-1]
    if name == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[:-1])))
    elif name == "embedding":
      value = 0.02 * rng.standard_normal(shape)
    elif name == "scale":
      value = np.ones(shape)
    elif name == "bias":
      value = np.zeros(shape)
    else:
      raise ValueError(f"no initializer for parameter {'/'.join(path)}")
    out[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def build_pipeline(*, unet: dict, vae: dict, text: dict, tokenizer, scheduler: schedulers.DDIMConfig,
                   params: dict | None = None, seed: int = 0, dtype: str = "float32",
                   attention_impl: str = "auto", path: str = "<in memory>",
                   unet_remat: bool = False, vae_remat: bool = False,
                   text_2: dict | None = None) -> pipeline_lib.Pipeline:
  """A Pipeline from diffusers-style config dicts: `params` ({"unet", "vae", "text_encoder"[,
  "text_encoder_2"]}), or a random init from `seed` (one numpy stream per component, in that
  order). `text_2` (a projected second text encoder, with the same tokenizer) makes it SDXL."""
  dt = jnp.dtype(dtype)
  encoders = (clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(text), dtype=dt,
                                 attention_impl=attention_impl),)
  if text_2 is not None:
    encoders += (clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(text_2), with_projection=True,
                                    dtype=dt, attention_impl=attention_impl),)
  pipe = pipeline_lib.Pipeline(
      unet=unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(unet), dtype=dt,
                                         attention_impl=attention_impl, remat=unet_remat),
      vae=vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(vae), dtype=dt,
                                attention_impl=attention_impl, remat=vae_remat),
      text_encoders=encoders, tokenizers=(tokenizer,) * len(encoders), scheduler=scheduler,
      params={}, path=path, force_zeros_for_empty_prompt=text_2 is not None)
  if params is None:
    abstract = pipe.abstract_params()
    seeds = np.random.SeedSequence(seed).spawn(len(abstract))
    params = {name: init_params(abstract[name], s) for name, s in zip(abstract, seeds)}
  return dataclasses.replace(pipe, params=params)


def random_pipeline(seed: int = 0, *, attention_impl: str = "auto", dtype: str = "float32",
                    unet_remat: bool = False, vae_remat: bool = False,
                    unet: dict = TINY_UNET, vae: dict = TINY_VAE, text: dict = TINY_TEXT,
                    text_2: dict | None = None, tokenizer_dir: str | None = None,
                    weights: bool = True) -> pipeline_lib.Pipeline:
  """A Pipeline with randomly initialised modules of the given diffusers-style configs and a
  merge-free CLIP tokenizer (one token per character, 77 positions). `weights=False` leaves
  params empty: for what needs only the modules and `abstract_params()` (memory estimates)."""
  if tokenizer_dir:
    clip_vocab.write(tokenizer_dir)
    tokenizer = clip_tokenizer.load(tokenizer_dir)
  else:  # read into memory from a folder removed at once: a run leaves nothing in $TMPDIR
    with tempfile.TemporaryDirectory(prefix="fnf_tiny_tokenizer_") as folder:
      clip_vocab.write(folder)
      tokenizer = dataclasses.replace(clip_tokenizer.load(folder), source="<tiny, in memory>")
  ids = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
             eos_token_id=tokenizer.eos_token_id)
  scheduler = schedulers.DDIMConfig(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, steps_offset=1, set_alpha_to_one=False)
  return build_pipeline(unet=unet, vae=vae, text=dict(text, **ids), tokenizer=tokenizer,
                        scheduler=scheduler, params=None if weights else {}, seed=seed,
                        dtype=dtype, attention_impl=attention_impl, path="<tiny random>",
                        unet_remat=unet_remat, vae_remat=vae_remat,
                        text_2=None if text_2 is None else dict(text_2, **ids))
