"""CLIP's configs and the published presets: plain data, so that conversion and loading can
name a model without building it.

Field names and defaults are transformers' (`CLIPTextConfig`, `CLIPVisionConfig`, `CLIPConfig`),
so `from_dict` reads a transformers config.json as it is.
"""

import dataclasses
from typing import Any, Mapping

# transformers' pooling rule: configs written before transformers PR #24773 say eos_token_id=2
# and pool at argmax(input_ids), which is the end-of-text token of the real vocabulary (49407,
# the largest id). OpenCLIP pools the same way, so its configs use 2 as well.
LEGACY_EOS_TOKEN_ID = 2


def _fields_of(cls, d: Mapping[str, Any]) -> dict:
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' CLIPTextConfig (defaults as transformers 5's)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    return cls(**_fields_of(cls, d))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' CLIPVisionConfig."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
    return cls(**_fields_of(cls, d))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers' CLIPConfig: both towers and the shared projection width."""
  text_config: CLIPTextConfig = CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
    out = _fields_of(cls, d)
    out["text_config"] = CLIPTextConfig.from_dict(d.get("text_config") or {})
    out["vision_config"] = CLIPVisionConfig.from_dict(d.get("vision_config") or {})
    return cls(**out)


def _preset(width, layers, heads, patch, text_width, text_layers, text_heads, proj, act):
  return CLIPConfig(
      text_config=CLIPTextConfig(
          hidden_size=text_width, intermediate_size=4 * text_width, projection_dim=proj,
          num_hidden_layers=text_layers, num_attention_heads=text_heads, hidden_act=act,
          eos_token_id=LEGACY_EOS_TOKEN_ID),
      vision_config=CLIPVisionConfig(
          hidden_size=width, intermediate_size=4 * width, projection_dim=proj,
          num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch,
          hidden_act=act),
      projection_dim=proj)


# The published configs (openai/clip-vit-base-patch32, openai/clip-vit-large-patch14,
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K). OpenAI's models use quick_gelu, LAION's exact gelu.
PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-32": _preset(768, 12, 12, 32, 512, 12, 8, 512, "quick_gelu"),
    "ViT-L-14": _preset(1024, 24, 16, 14, 768, 12, 12, 768, "quick_gelu"),
    "ViT-H-14": _preset(1280, 32, 16, 14, 1024, 24, 16, 1024, "gelu"),
}
VIT_B_32, VIT_L_14, VIT_H_14 = PRESETS["ViT-B-32"], PRESETS["ViT-L-14"], PRESETS["ViT-H-14"]
