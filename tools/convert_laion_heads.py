"""One-time conversion of LAION's CLIP heads to the safetensors layout fnf_jax/rewards/laion.py
reads: dense_{i}.kernel [in, out], dense_{i}.bias [out] (i = 0, 1, ...) and, for the NSFW head,
normalization.mean / normalization.variance [in].

Aesthetic predictor v2 (a torch state dict: layers.{0,2,4,6,7}.weight/bias, dropouts between):
    wget https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth
    python tools/convert_laion_heads.py aesthetic sac+logos+ava1-l14-linearMSE.pth /models/laion/aesthetic_vit_l14.safetensors

NSFW detector, ViT-L/14 (the authors' PyTorch port: norm.mean, norm.variance, linear_{1..4}):
    wget https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/models/clip_ViT-L-14_openai_binary_nsfw_head.pth
    python tools/convert_laion_heads.py nsfw clip_ViT-L-14_openai_binary_nsfw_head.pth /models/laion/nsfw_vit_l14.safetensors
or the original AutoKeras model (an unzipped clip_autokeras_binary_nsfw folder; needs
tensorflow and autokeras):
    python tools/convert_laion_heads.py nsfw clip_autokeras_binary_nsfw /models/laion/nsfw_vit_l14.safetensors

Needs torch for .pth inputs (a tool, not the runtime).
"""

import re
import sys

import numpy as np
from safetensors.numpy import save_file


def _linears(sd: dict, prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(kernel [in, out], bias) of every `{prefix}{n}.weight` Linear, in numeric order of n."""
  found = sorted((int(m.group(1)), k) for k in sd
                 if (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", k)))
  if not found:
    raise ValueError(f"no {prefix}<n>.weight keys in {sorted(sd)}")
  return [(np.asarray(sd[k]).T, np.asarray(sd[k[:-len("weight")] + "bias"])) for _, k in found]


def _pack(dense, mean=None, variance=None) -> dict[str, np.ndarray]:
  out = {}
  for i, (kernel, bias) in enumerate(dense):
    out[f"dense_{i}.kernel"], out[f"dense_{i}.bias"] = kernel, bias
  if mean is not None:
    out["normalization.mean"] = np.asarray(mean).reshape(-1)
    out["normalization.variance"] = np.asarray(variance).reshape(-1)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def aesthetic_from_state_dict(sd: dict) -> dict[str, np.ndarray]:
  return _pack(_linears(sd, "layers."))


def nsfw_from_state_dict(sd: dict) -> dict[str, np.ndarray]:
  return _pack(_linears(sd, "linear_"), sd["norm.mean"], sd["norm.variance"])


def nsfw_from_keras_layers(layer_weights: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
  """From `[layer.get_weights() for layer in model.layers]` of the AutoKeras model: a
  Normalization layer gives [mean, variance, count]; Dense layers [kernel (in, out), bias]."""
  dense, norm = [], None
  for weights in layer_weights:
    if len(weights) == 3 and np.size(weights[2]) == 1:
      norm = weights[:2]
    elif len(weights) == 2 and np.ndim(weights[0]) == 2:
      dense.append(tuple(weights))
    elif weights:
      raise ValueError(f"unexpected layer weights with shapes {[np.shape(w) for w in weights]}")
  if norm is None:
    raise ValueError("no Normalization layer found")
  return _pack(dense, *norm)


def _read(path: str):
  if path.endswith((".pth", ".pt")):
    import torch  # pylint: disable=g-import-not-at-top
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}
  import autokeras as ak  # pylint: disable=g-import-not-at-top
  from tensorflow.keras.models import load_model  # pylint: disable=g-import-not-at-top
  model = load_model(path, custom_objects=ak.CUSTOM_OBJECTS)
  return [layer.get_weights() for layer in model.layers]


def main(argv) -> None:
  if len(argv) != 3 or argv[0] not in ("aesthetic", "nsfw"):
    sys.exit(__doc__)
  kind, src, dst = argv
  raw = _read(src)
  if kind == "aesthetic":
    out = aesthetic_from_state_dict(raw)
  else:
    out = nsfw_from_keras_layers(raw) if isinstance(raw, list) else nsfw_from_state_dict(raw)
  save_file(out, dst)
  print(f"wrote {dst}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


if __name__ == "__main__":
  main(sys.argv[1:])
