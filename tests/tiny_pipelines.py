"""Tiny random diffusers pipelines of each supported family, written with save_pretrained.

Used by the pipeline parity tests (and anything else that needs a whole checkpoint folder).
Everything is built locally from configs; nothing is downloaded.
"""

import os

import torch

import tokenizer_fixture

FAMILIES = ("sd1", "sd2", "sdxl")

# SD 1.5's real scheduler_config.json (a PNDM scheduler, which we run as DDIM on its schedule).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1, trained_betas=None)


def _text_encoder(projection: bool, hidden_act: str, eos_token_id: int, seed: int):
  import transformers  # pylint: disable=g-import-not-at-top

  cfg = transformers.CLIPTextConfig(
      vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
      num_hidden_layers=3, max_position_embeddings=77, hidden_act=hidden_act, projection_dim=32,
      bos_token_id=eos_token_id - 1, eos_token_id=eos_token_id, pad_token_id=1)
  torch.manual_seed(seed)
  cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  return cls(cfg).eval()


def _unet(family: str, seed: int):
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  common = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  if family == "sd1":
    extra = dict(cross_attention_dim=32, attention_head_dim=4)
  elif family == "sd2":
    extra = dict(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
                 upcast_attention=True)
  else:
    extra = dict(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                 transformer_layers_per_block=(2, 1), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
  torch.manual_seed(seed)
  return UNet2DConditionModel(**{**common, **extra}).eval()


def _vae(seed: int):
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                       norm_num_groups=8, layers_per_block=1, sample_size=32).eval()


def _tokenizer(folder: str, pad_token: str):
  import transformers  # pylint: disable=g-import-not-at-top

  tokenizer_fixture.write_tiny_clip_tokenizer(folder, pad_token=pad_token)
  return transformers.CLIPTokenizer.from_pretrained(folder)


def build(family: str, folder: str, seed: int = 0):
  """Writes a tiny `family` pipeline to `folder`; returns the diffusers pipeline object."""
  import diffusers  # pylint: disable=g-import-not-at-top

  if family not in FAMILIES:
    raise ValueError(family)
  scratch = os.path.join(folder, "_tokenizers")
  tok = _tokenizer(os.path.join(scratch, "1"), "<|endoftext|>" if family == "sd1" else "!")
  eos = tok.eos_token_id
  vae, unet = _vae(seed), _unet(family, seed + 1)
  if family == "sd1":
    scheduler = diffusers.PNDMScheduler(**SD15_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=_text_encoder(False, "quick_gelu", eos, seed + 2), tokenizer=tok,
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
  elif family == "sd2":
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
        timestep_spacing="trailing")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=_text_encoder(False, "gelu", eos, seed + 2), tokenizer=tok,
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
  else:
    tok2 = _tokenizer(os.path.join(scratch, "2"), "!")
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=_text_encoder(False, "quick_gelu", eos, seed + 2),
        text_encoder_2=_text_encoder(True, "gelu", eos, seed + 3), tokenizer=tok,
        tokenizer_2=tok2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
  pipe.save_pretrained(folder, safe_serialization=True)
  # The reference runs DDIM on the checkpoint's own noise schedule, as fnf_jax does.
  pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  return pipe
