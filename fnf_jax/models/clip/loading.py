"""Checkpoints -> CLIP modules with params: `load_text_encoder` (SD / SDXL text encoders) and
`load` (a full CLIPModel). `Clip`, what `load` returns, lives here too: it binds the module to
its params and tokenizer for the rewards.

Both loaders return float32 params whatever `dtype` (the compute dtype): `load_text_encoder` as
host numpy arrays, `load` placed on the default device.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnf_jax.models import clip_tokenizer
from fnf_jax.models import convert
from fnf_jax.models.clip.configs import PRESETS, CLIPConfig, CLIPTextConfig
from fnf_jax.models.clip.openclip import config_from_openclip, openclip_to_transformers
from fnf_jax.models.clip.preprocess import preprocess_images
from fnf_jax.models.clip.towers import CLIPModel, CLIPTextModel, TextOutput, VisionOutput

# Buffers of transformers checkpoints (older ones saved position_ids) that are no parameters.
_IGNORE = (r"(^|\.)position_ids$",)


def _dtype(dtype) -> Any:
  return jnp.dtype(dtype)


def _text_rename(keys) -> list[tuple[str, str]]:
  # transformers 4 saved CLIPTextModel under "text_model."; transformers 5 saves it flat.
  if any(k.startswith("text_model.") for k in keys):
    return []
  return [(r"^(?!text_projection\.)", "text_model.")]


def load_text_encoder(folder: str, *, dtype="float32", attention_impl: str = "auto",
                      remat: bool = False) -> tuple[CLIPTextModel, dict]:
  """A diffusers/transformers text encoder folder -> (CLIPTextModel module, params).

  Params are float32 numpy arrays (place or shard them as you like); `dtype` is the compute dtype.
  """
  config, state_dict = convert.read_component(folder)
  arch = (config.get("architectures") or ["CLIPTextModel"])[0]
  if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
    raise convert.CheckpointError(
        f"{folder!r} holds a {arch}; load_text_encoder reads CLIPTextModel or "
        "CLIPTextModelWithProjection folders (use clip.load for a full CLIPModel)")
  module = CLIPTextModel(CLIPTextConfig.from_dict(config),
                         with_projection=arch == "CLIPTextModelWithProjection",
                         dtype=_dtype(dtype), attention_impl=attention_impl, remat=remat)
  abstract = convert.abstract_params(module, jnp.zeros((1, 1), jnp.int32))
  params = convert.to_params(state_dict, abstract, where=folder,
                             rename=_text_rename(state_dict), ignore=_IGNORE)
  return module, params


@dataclasses.dataclass(eq=False)
class Clip:
  """A loaded CLIPModel: pure functions of (params, inputs) plus bound conveniences.

  `image_features(params, images)` / `vision_outputs(params, images)` take [B, H, W, 3] images in
  [0, 1] and are safe under jit and grad (resizing and normalisation happen inside);
  `text_features(params, input_ids)` takes token ids. `encode_image` / `encode_text` use the
  loaded params (and the tokenizer for text) and are jitted.
  """
  module: CLIPModel
  params: Any
  tokenizer: clip_tokenizer.ClipTokenizer | None = None

  def __post_init__(self):
    self._encode_image = jax.jit(self.image_features)
    self._encode_text = jax.jit(self.text_features)

  @property
  def config(self) -> CLIPConfig:
    return self.module.config

  @property
  def image_size(self) -> int:
    return self.config.vision_config.image_size

  def preprocess(self, images: jax.Array) -> jax.Array:
    return preprocess_images(images, self.image_size)

  def vision_outputs(self, params, images: jax.Array, perturbations=None) -> VisionOutput:
    """Every vision output: tokens of each layer (class token first, then the patches in
    row-major order), pooled and image_embeds. With `perturbations` (see
    `vision_perturbations`), differentiating with respect to them gives the gradient with
    respect to each layer's output tokens."""
    pixels = self.preprocess(images).astype(self.module.dtype)
    variables = {"params": params}
    if perturbations is not None:
      variables["perturbations"] = perturbations
    return self.module.apply(variables, pixels, method=CLIPModel.vision_outputs)

  def vision_perturbations(self, batch: int) -> dict:
    """Zeros for `vision_outputs(..., perturbations=)`, one per vision layer output:
    ["vision_model"]["encoder"][f"hidden_states_{i}"], [batch, 1 + patches, width]."""
    size = self.image_size
    shapes = jax.eval_shape(lambda: self.module.init(
        jax.random.key(0), jnp.zeros((batch, size, size, 3), self.module.dtype),
        method=CLIPModel.vision_outputs))["perturbations"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def image_features(self, params, images: jax.Array) -> jax.Array:
    """transformers' get_image_features of `images` ([B, H, W, 3] in [0, 1]): [B, P]."""
    return self.vision_outputs(params, images).image_embeds

  def text_outputs(self, params, input_ids: jax.Array) -> TextOutput:
    return self.module.apply({"params": params}, input_ids, method=CLIPModel.text_outputs)

  def text_features(self, params, input_ids: jax.Array) -> jax.Array:
    """transformers' get_text_features of token ids [B, T]: [B, P]."""
    return self.text_outputs(params, input_ids).text_embeds

  def tokenize(self, prompts) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError("this Clip was loaded without a tokenizer: pass `tokenizer=` to load")
    return self.tokenizer(prompts)

  def encode_image(self, images) -> jax.Array:
    return self._encode_image(self.params, jnp.asarray(images))

  def encode_text(self, prompts) -> jax.Array:
    return self._encode_text(self.params, jnp.asarray(self.tokenize(prompts)))


OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def _find_tokenizer(path: str, tokenizer) -> clip_tokenizer.ClipTokenizer | None:
  if isinstance(tokenizer, clip_tokenizer.ClipTokenizer):
    return tokenizer
  if isinstance(tokenizer, str):
    return clip_tokenizer.load(tokenizer)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  for candidate in (folder, os.path.join(folder, "tokenizer")):
    if os.path.isdir(candidate) and any(
        os.path.isfile(os.path.join(candidate, f))
        for f in (clip_tokenizer.TOKENIZER_JSON, clip_tokenizer.VOCAB_JSON)):
      return clip_tokenizer.load(candidate)
  return None  # encode_text then says how to pass one


def load(path: str, *, dtype="float32", attention_impl: str = "auto", remat: bool = False,
         config: CLIPConfig | str | None = None,
         tokenizer: "str | clip_tokenizer.ClipTokenizer | None" = None) -> Clip:
  """A CLIPModel -> `Clip`, its params float32 on the default device; `dtype` is the compute dtype.

  `path` is a transformers folder (config.json with CLIPModel, model.safetensors) or an OpenCLIP
  / OpenAI state dict in safetensors (a file, or a folder holding one of OPENCLIP_FILES). For
  OpenCLIP weights `config` (a CLIPConfig or a PRESETS name) may be left out for the presets'
  shapes (see config_from_openclip). The tokenizer comes from `tokenizer` (a folder or a
  ClipTokenizer), else from the folder of `path` or its `tokenizer/` subfolder.
  """
  openclip_file = None
  if os.path.isfile(path):
    openclip_file = path
  elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
    found = [os.path.join(path, f) for f in OPENCLIP_FILES
             if os.path.isfile(os.path.join(path, f))]
    if not found:
      raise convert.CheckpointError(
          f"{path!r} holds neither a transformers CLIPModel (config.json + model.safetensors) "
          f"nor OpenCLIP weights ({', '.join(OPENCLIP_FILES)}); found {sorted(os.listdir(path))}")
    openclip_file = found[0]
  elif not os.path.exists(path):
    raise convert.CheckpointError(f"CLIP checkpoint not found: {path!r}")

  if openclip_file is not None:
    if not openclip_file.endswith(".safetensors"):
      raise convert.CheckpointError(f"{openclip_file!r}: fnf_jax reads safetensors only")
    raw = convert.read_state_dict([openclip_file])
    state_dict = openclip_to_transformers(raw)
    if isinstance(config, str):
      config = PRESETS[config]
    config = config or config_from_openclip(raw)
    where = openclip_file
  else:
    raw_config, state_dict = convert.read_component(path)
    arch = (raw_config.get("architectures") or ["CLIPModel"])[0]
    if arch != "CLIPModel":
      raise convert.CheckpointError(f"{path!r} holds a {arch}, not a CLIPModel")
    config = CLIPConfig.from_dict(raw_config)
    where = path

  module = CLIPModel(config, dtype=_dtype(dtype), attention_impl=attention_impl, remat=remat)
  size = config.vision_config.image_size
  abstract = convert.abstract_params(module, jnp.zeros((1, 1), jnp.int32),
                                     jnp.zeros((1, size, size, 3), jnp.float32))
  params = convert.to_params(state_dict, abstract, where=where, ignore=_IGNORE)
  return Clip(module=module, params=jax.device_put(params),
              tokenizer=_find_tokenizer(path, tokenizer))
