"""OpenCLIP / OpenAI CLIP state dicts -> transformers' key names and a config.

OpenCLIP files carry no config and name their weights differently; re-laying them out as
transformers' CLIPModel keys lets one loader (`loading.load`) and one key rule serve both.
"""

import re
from typing import Mapping

import numpy as np

from fnf_jax.models import convert
from fnf_jax.models.clip.configs import PRESETS, CLIPConfig


def openclip_to_transformers(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Re-lays an OpenCLIP / OpenAI CLIP state dict out as transformers' CLIPModel keys.

  OpenCLIP fuses q/k/v into `attn.in_proj_weight` ([3D, D], q first) and keeps the projections
  as matrices used as `x @ proj`, where transformers has Linear weights (`proj.T`).
  """
  prefix_map = (
      (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
      (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
  )
  leaf_map = {
      "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
      "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
  }
  simple = {
      "visual.class_embedding": "vision_model.embeddings.class_embedding",
      "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
      "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
      "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
      "positional_embedding": "text_model.embeddings.position_embedding.weight",
  }
  norms = {"visual.ln_pre": "vision_model.pre_layrnorm",
           "visual.ln_post": "vision_model.post_layernorm",
           "ln_final": "text_model.final_layer_norm"}
  # Non-parameters of OpenAI's JIT archives and OpenCLIP's attention-mask buffer.
  skip = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key in skip:
      continue
    if key == "logit_scale":
      out[key] = value.reshape(())  # a 0-d parameter; some exporters write it as [1]
    elif key in simple:
      out[simple[key]] = value
    elif key in ("visual.proj", "text_projection"):
      name = "visual_projection" if key == "visual.proj" else "text_projection"
      out[f"{name}.weight"] = value.T
    elif key.rsplit(".", 1)[0] in norms:
      base, leaf = key.rsplit(".", 1)
      out[f"{norms[base]}.{leaf}"] = value
    else:
      new = key
      for pattern, repl in prefix_map:
        new = re.sub(pattern, repl, new)
      if new == key:
        out[key] = value  # unknown: to_params names it in its error
        continue
      layer, rest = re.match(r"^(.*\.layers\.\d+)\.(.*)$", new).groups()
      if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = "weight" if rest.endswith("weight") else "bias"
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
          out[f"{layer}.self_attn.{name}.{leaf}"] = part
        continue
      base, leaf = rest.rsplit(".", 1)
      out[f"{layer}.{leaf_map.get(base, base)}.{leaf}"] = value
  return out


def _openclip_shapes(sd: Mapping[str, np.ndarray]) -> dict[str, int]:
  """What an OpenCLIP state dict's shapes say about its architecture."""
  def count(prefix):  # number of distinct layer indices after `prefix`
    return len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

  patch = sd["visual.conv1.weight"].shape[-1]
  grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  return {
      "vision_width": sd["visual.conv1.weight"].shape[0],
      "vision_mlp": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      "vision_layers": count("visual.transformer.resblocks."),
      "image_size": grid * patch,
      "patch_size": patch,
      "text_width": sd["ln_final.weight"].shape[0],
      "text_mlp": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      "text_layers": count("transformer.resblocks."),
      "vocab_size": sd["token_embedding.weight"].shape[0],
      "context_length": sd["positional_embedding"].shape[0],
      "projection_dim": sd["text_projection"].shape[1],
  }


def _preset_shapes(c: CLIPConfig) -> dict[str, int]:
  v, t = c.vision_config, c.text_config
  return {
      "vision_width": v.hidden_size, "vision_mlp": v.intermediate_size,
      "vision_layers": v.num_hidden_layers, "image_size": v.image_size,
      "patch_size": v.patch_size, "text_width": t.hidden_size, "text_mlp": t.intermediate_size,
      "text_layers": t.num_hidden_layers, "vocab_size": t.vocab_size,
      "context_length": t.max_position_embeddings, "projection_dim": c.projection_dim,
  }


def config_from_openclip(state_dict: Mapping[str, np.ndarray]) -> CLIPConfig:
  """The preset whose shapes an OpenCLIP / OpenAI state dict has.

  Neither the head count (OpenCLIP's head width is 64 for most towers but 80 for ViT-H's vision
  tower) nor the activation (quick_gelu for OpenAI-trained models, gelu for OpenCLIP-trained
  ones) is in the weights, so anything but a known preset needs an explicit config.
  """
  shapes = _openclip_shapes(state_dict)
  for preset in PRESETS.values():
    if _preset_shapes(preset) == shapes:
      return preset
  raise convert.CheckpointError(
      f"OpenCLIP weights with shapes {shapes} match no preset ({', '.join(PRESETS)}): pass "
      "`config=` (a CLIPConfig with the model's head counts and hidden_act)")
