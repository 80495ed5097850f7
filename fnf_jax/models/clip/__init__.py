"""CLIP in Flax linen: the text tower (SD / SDXL text encoders) and the vision tower (rewards).

Callers use the flat names below (`clip.load`, `clip.CLIPTextModel`, ...); the files split them
by concern:

  configs     CLIPTextConfig / CLIPVisionConfig / CLIPConfig and PRESETS
  towers      the linen modules, TextOutput / VisionOutput, pool_index
  openclip    OpenCLIP / OpenAI state dicts -> transformers' keys, config_from_openclip
  preprocess  preprocess_images (differentiable resize + normalisation)
  loading     load_text_encoder(folder) -> (CLIPTextModel, params);
              load(path) -> `Clip`, with encode_image / encode_text and pure
              `image_features(params, ...)`
"""

import dataclasses  # noqa: F401  (tests call clip.dataclasses.replace, as with the old module)

from fnf_jax.models.clip.configs import (LEGACY_EOS_TOKEN_ID, PRESETS, VIT_B_32, VIT_H_14,
                                         VIT_L_14, CLIPConfig, CLIPTextConfig, CLIPVisionConfig)
from fnf_jax.models.clip.loading import OPENCLIP_FILES, Clip, load, load_text_encoder
from fnf_jax.models.clip.openclip import config_from_openclip, openclip_to_transformers
from fnf_jax.models.clip.preprocess import IMAGE_MEAN, IMAGE_STD, preprocess_images
from fnf_jax.models.clip.towers import (ACTIVATIONS, CLIPMLP, CLIPAttention, CLIPEncoder,
                                        CLIPEncoderLayer, CLIPModel, CLIPTextEmbeddings,
                                        CLIPTextModel, CLIPTextTransformer, CLIPVisionEmbeddings,
                                        CLIPVisionTransformer, TextOutput, VisionOutput,
                                        pool_index)
