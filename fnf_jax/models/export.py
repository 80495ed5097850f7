"""Flax params -> a diffusers-format Stable Diffusion folder (the reverse of `convert`).

    export_pipeline("toy_sd", unet_config=..., unet_params=..., vae_config=..., vae_params=...,
                    text_config=..., text_params=..., tokenizer_dir=..., scheduler_config=...)

writes model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/ so that a model
trained here (the toy world's, say) ships as a real checkpoint: `fnf_jax.diffusion.pipeline.load` reads
it like any SD folder and diffusers' `StableDiffusionPipeline.from_pretrained` loads it too. No
torch is needed to write it. `replace_unet(source, folder, unet_params=...)` writes a copy of an
existing folder with other UNet weights (a merged LoRA: tools/merge_lora.py).

Key rule: module paths by `convert.torch_key` (the rule the LoRA export shares); Dense kernels
[in, out] -> Linear weights [out, in]; Conv kernels [kh, kw, I, O] -> [O, I, kh, kw]; `scale`
and `embedding` -> `weight`. Before anything is written the whole state dict goes back through
`convert.to_params` against the config's model: an export that would not load fails here,
naming the parameter.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fnf_jax.diffusion import schedulers
from fnf_jax.models import clip
from fnf_jax.models import clip_tokenizer
from fnf_jax.models import convert
from fnf_jax.models import unet as unet_lib
from fnf_jax.models import vae as vae_lib

# Written as the version that produced the configs' conventions; diffusers reads it for
# legacy-behaviour switches only.
DIFFUSERS_VERSION = "0.30.0"


def state_dict(params: Any, *, dtype=np.float32) -> dict[str, np.ndarray]:
  """A Flax params tree (boxed or not) -> PyTorch-layout state dict (key -> numpy array)."""
  out = {}
  for path, value in traverse_util.flatten_dict(nn.meta.unbox(params)).items():
    *parents, leaf = path
    value = np.asarray(value)
    if leaf == "kernel":
      if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif value.ndim == 2:
        value = value.T
      else:
        raise ValueError(f"kernel {'/'.join(path)} has shape {value.shape}: only Dense (2-D) and "
                         "Conv2d (4-D) kernels have a PyTorch layout")
      leaf = "weight"
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    key = f"{convert.torch_key(parents)}.{leaf}" if parents else leaf
    if convert.flax_path(key)[:-1] != tuple(parents):
      raise ValueError(f"parameter {'/'.join(path)} has no PyTorch key that maps back to it "
                       f"(got {key!r}): module names may not contain '.'")
    out[key] = np.ascontiguousarray(value.astype(dtype))
  return out


def _as_dict(config: Any) -> dict:
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  if not isinstance(config, Mapping):
    raise TypeError(f"a config must be a dict (config.json format) or a config dataclass, got "
                    f"{type(config).__name__}")
  return json.loads(json.dumps(dict(config)))  # tuples -> lists; fails early on non-JSON values


def _check(state: dict, module: nn.Module, inputs: tuple, where: str) -> None:
  """The exported state dict must load back onto the config's module: same keys, same shapes."""
  convert.to_params(state, convert.abstract_params(module, *inputs), where=where)


def _write_component(folder: str, config: dict, state: dict, weights: str) -> None:
  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  # transformers refuses safetensors files whose metadata names no framework.
  convert.write_safetensors(os.path.join(folder, weights), state, metadata={"format": "pt"})


def export_pipeline(folder: str, *, unet_config, unet_params, vae_config, vae_params, text_config,
                    text_params, tokenizer_dir: str, scheduler_config,
                    overwrite: bool = False) -> str:
  """Writes a StableDiffusionPipeline folder (float32 safetensors); returns `folder`.

  Configs are dicts in config.json format (or the config dataclasses); params are the Flax trees
  of UNet2DConditionModel, AutoencoderKL and CLIPTextModel. The folder is assembled next to its
  destination and moved into place, so a crash never leaves a half-written checkpoint; an
  existing folder is replaced only with `overwrite=True` and only if it holds a pipeline.
  """
  folder = os.path.abspath(folder)
  if os.path.exists(folder) and not overwrite:  # before the checks' work (again when writing)
    raise FileExistsError(f"{folder!r} exists; pass overwrite=True to replace it")
  unet_cfg, vae_cfg = _as_dict(unet_config), _as_dict(vae_config)
  text_cfg, sched_cfg = _as_dict(text_config), _as_dict(scheduler_config)
  clip_tokenizer.load(tokenizer_dir)  # fails early, naming what is missing
  schedulers.DDIMConfig.from_dict(sched_cfg)
  unet_module = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(unet_cfg))
  vae_module = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(vae_cfg))
  text_module = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(text_cfg))
  unet_state, vae_state = state_dict(unet_params), state_dict(vae_params)
  text_state = state_dict(text_params)
  _check(text_state, text_module, (jnp.zeros((1, 1), jnp.int32),), "text_params")
  _check(vae_state, vae_module, (vae_lib.dummy_images(vae_module.config),), "vae_params")
  _check(unet_state, unet_module, unet_lib.dummy_inputs(unet_module.config), "unet_params")

  with _staged(folder, overwrite) as staging:
    meta = {"_diffusers_version": DIFFUSERS_VERSION}
    _write_component(os.path.join(staging, "unet"),
                     {**meta, **unet_cfg, "_class_name": "UNet2DConditionModel"}, unet_state,
                     "diffusion_pytorch_model.safetensors")
    _write_component(os.path.join(staging, "vae"),
                     {**meta, **vae_cfg, "_class_name": "AutoencoderKL"}, vae_state,
                     "diffusion_pytorch_model.safetensors")
    text_cfg = {**text_cfg, "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                "torch_dtype": "float32"}
    _write_component(os.path.join(staging, "text_encoder"), text_cfg, text_state,
                     "model.safetensors")
    shutil.copytree(tokenizer_dir, os.path.join(staging, "tokenizer"))
    os.makedirs(os.path.join(staging, "scheduler"))
    with open(os.path.join(staging, "scheduler", "scheduler_config.json"), "w") as f:
      json.dump({**meta, "_class_name": "DDIMScheduler", **sched_cfg}, f, indent=2, sort_keys=True)
    index = {"_class_name": "StableDiffusionPipeline", **meta,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", sched_cfg.get("_class_name", "DDIMScheduler")],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None], "requires_safety_checker": False}
    with open(os.path.join(staging, "model_index.json"), "w") as f:
      json.dump(index, f, indent=2)
  return folder


def replace_unet(source: str, folder: str, *, unet_params, overwrite: bool = False) -> str:
  """Writes a copy of the diffusers folder `source` whose UNet weights are `unet_params` (a
  float32 unet/diffusion_pytorch_model.safetensors; every other file copied as it is, so SD 1.x,
  2.x and SDXL folders alike); returns `folder`. How tools/merge_lora.py ships a LoRA merged
  into the UNet. The weights are checked against unet/config.json first, and the folder is
  assembled beside its destination as `export_pipeline` does."""
  source, folder = os.path.abspath(source), os.path.abspath(folder)
  if not os.path.isfile(os.path.join(source, "model_index.json")):
    raise convert.CheckpointError(f"{source!r} holds no model_index.json: not a diffusers "
                                  "pipeline folder")
  if source == folder:
    raise ValueError(f"replace_unet: the output {folder!r} is the source folder")
  unet_dir = os.path.join(source, "unet")
  module = unet_lib.UNet2DConditionModel(
      unet_lib.UNetConfig.from_dict(convert.read_config(unet_dir)))
  state = state_dict(unet_params)
  _check(state, module, unet_lib.dummy_inputs(module.config), "unet_params")
  # The source's UNet weights (any variant, sharding or pickle) are not copied: stale copies
  # beside the new file would load instead of it with variant= or from an index.
  weights = lambda d, names: [n for n in names if os.path.normpath(d) == unet_dir and (
      n.endswith((".safetensors", ".bin", ".index.json", ".pt", ".ckpt")))]
  with _staged(folder, overwrite) as staging:
    os.rmdir(staging)
    shutil.copytree(source, staging, ignore=weights)
    convert.write_safetensors(os.path.join(staging, "unet", "diffusion_pytorch_model.safetensors"),
                              state, metadata={"format": "pt"})
  return folder


@contextlib.contextmanager
def _staged(folder: str, overwrite: bool):
  """A fresh folder beside `folder` to assemble it in, moved into place when the block ends
  (and removed if it fails): a crash never leaves a half-written checkpoint. An existing
  `folder` is replaced only with `overwrite` and only if it holds a pipeline."""
  if os.path.exists(folder):
    if not overwrite:
      raise FileExistsError(f"{folder!r} exists; pass overwrite=True to replace it")
    if os.listdir(folder) and not os.path.isfile(os.path.join(folder, "model_index.json")):
      raise FileExistsError(f"{folder!r} is not empty and holds no model_index.json: refusing "
                            "to replace a folder that is not a pipeline")
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".partial-",
                             dir=os.path.dirname(folder))
  try:
    yield staging
    if os.path.exists(folder):
      shutil.rmtree(folder)
    os.replace(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
