"""The toy world's model family: diffusers-format configs, a word-level CLIP tokenizer, random init.

The same architecture as Stable Diffusion (KL VAE + UNet2DConditionModel + CLIP text encoder),
shrunk until pretraining on the toy world (`world.py`) fits a CPU:

  VAE    f = 2: 32x32x3 -> 16x16x4 latents. An f = 4 autoencoder (no KL term) lost the defect in a
         third of reconstructions in a feasibility study; f = 2 keeps 3x3 px blotches at >= 1
         latent pixel. Channels (16, 32), 0.17 M params: every conv of a VAE runs at 32x32, and
         (32, 64) made a step 2.7x slower. 4 norm groups: in short runs, 8 groups (2 channels each) shifted colours (yellow to
         orange) far longer. Its scaling_factor is a placeholder (1.0): set it to
         `latent_scaling_factor` of the trained encoder's latents before training the UNet.
  UNet   16x16 latents, channels (32, 64, 96), 2.7 M params. Cross-attention at 8x8 and 4x4
         (and the mid block) only: attention at 16x16 made a step 2.3x slower on CPU, and colour
         and shape are global properties that the coarse levels bind.
  text   CLIP, width 64, 2 layers, 4 heads, 16 positions (the pipeline pads to the tokenizer's
         model_max_length; SD's 77 made a UNet training step 15% slower).
  tokens byte-level CLIP BPE (`fnf_jax.models.clip_vocab`) whose merges spell each word of WORDS
         as one token; other words fall back to letters, as in the real vocabulary.

Configs are plain dicts in the format of diffusers' / transformers' config.json, so
UNetConfig.from_dict, VAEConfig.from_dict, CLIPTextConfig.from_dict and diffusers itself read them,
and `fnf_jax.models.export.export_pipeline` writes them unchanged.
"""

import os

import jax
import numpy as np

from fnf_jax.diffusion import pipeline as pipeline_lib
from fnf_jax.diffusion import random_models
from fnf_jax.diffusion import schedulers
from fnf_jax.models import clip_tokenizer
from fnf_jax.models import clip_vocab

# Caption words first (world.captions() uses only these), then a few for prompt variants.
WORDS = ("a", "red", "green", "blue", "yellow", "circle", "square", "triangle",
         "an", "the", "of", "on", "in", "and", "with", "no", "shape", "photo", "dark", "brown",
         "spot", "stain", "clean")
TEXT_WIDTH = 64
# Token positions (bos + words + eos, padded). The toy prompts have at most 8 words; 77 (SD's)
# would make every cross-attention and the text encoder ~5x wider for nothing.
MAX_TOKENS = 16
LATENT_CHANNELS = 4
LATENT_SIZE = 16


def write_tokenizer(folder: str) -> str:
  """Writes the toy CLIP tokenizer (every word of WORDS one token, MAX_TOKENS positions, padded
  with eos as SD 1.x) into `folder`; returns `folder`."""
  clip_vocab.write(folder, words=WORDS, model_max_length=MAX_TOKENS)
  tok = clip_tokenizer.load(folder)
  split = {w: tok.encode(w) for w in WORDS if len(tok.encode(w)) != 1}
  if split:  # a word list whose merges interfere; reorder WORDS
    raise AssertionError(f"toy tokenizer splits vocabulary words: {split}")
  return folder


def unet_config() -> dict:
  return {
      "_class_name": "UNet2DConditionModel",
      "sample_size": LATENT_SIZE, "in_channels": LATENT_CHANNELS,
      "out_channels": LATENT_CHANNELS, "block_out_channels": [32, 64, 96],
      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
      "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
      "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": 1,
      "norm_num_groups": 8, "cross_attention_dim": TEXT_WIDTH,
      "attention_head_dim": 4,  # diffusers' name for the number of heads (head size 16 / 24)
      "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
  }


def vae_config(scaling_factor: float = 1.0) -> dict:
  return {
      "_class_name": "AutoencoderKL",
      "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
      "latent_channels": LATENT_CHANNELS, "layers_per_block": 1, "norm_num_groups": 4,
      "act_fn": "silu", "sample_size": 32, "scaling_factor": float(scaling_factor),
      "force_upcast": False,
  }


def text_config() -> dict:
  vocab, _ = clip_vocab.vocabulary(WORDS)
  return {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      "vocab_size": len(vocab), "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH,
      "projection_dim": TEXT_WIDTH, "num_hidden_layers": 2, "num_attention_heads": 4,
      "max_position_embeddings": MAX_TOKENS, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
      "bos_token_id": vocab[clip_vocab.BOS], "eos_token_id": vocab[clip_vocab.EOS],
      "pad_token_id": vocab[clip_vocab.EOS],
  }


def scheduler_config() -> dict:
  """DDIM on a cosine schedule (what the toy UNet is trained with), with SD's "leading" spacing.

  Not "trailing": the cosine schedule's last training step keeps alpha_bar = 2.4e-9 of signal,
  and DDIM's first x0 estimate from an ε-prediction there divides the model's error by
  sqrt(alpha_bar) = 5e-5; the samples were noise. "leading" starts at t = 901 (10 steps) or 951
  (20 steps), where alpha_bar is 0.02 / 0.006, as SD 1.x starts at 981."""
  return {
      "_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
      "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02,
      "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False,
      "steps_offset": 1, "timestep_spacing": "leading",
  }


def latent_scaling_factor(latents) -> float:
  """1 / std of encoder latents (SD's rule for its 0.18215), so the UNet sees unit-scale data."""
  std = float(np.std(np.asarray(latents, np.float64)))
  if not std > 0:
    raise ValueError("latents have zero spread: is the VAE trained?")
  return 1.0 / std


def build_pipeline(tokenizer_dir: str, *, params: dict | None = None, seed: int = 0,
                   vae_scaling_factor: float = 1.0,
                   attention_impl: str = "auto") -> pipeline_lib.Pipeline:
  """A toy Pipeline in memory: `params` ({"unet", "vae", "text_encoder"}) or a random init.

  `tokenizer_dir` is written with `write_tokenizer` if it holds no tokenizer yet.
  """
  if not os.path.isfile(os.path.join(tokenizer_dir, "vocab.json")):
    write_tokenizer(tokenizer_dir)
  return random_models.build_pipeline(
      unet=unet_config(), vae=vae_config(vae_scaling_factor), text=text_config(),
      tokenizer=clip_tokenizer.load(tokenizer_dir),
      scheduler=schedulers.DDIMConfig.from_dict(scheduler_config()), params=params, seed=seed,
      attention_impl=attention_impl, path="<toy, in memory>")


def count_params(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
