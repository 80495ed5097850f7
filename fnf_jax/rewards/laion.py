"""LAION's MLP heads on (L2-normalised) CLIP ViT-L/14 image embeddings.

`laion_nsfw`       LAION-AI/CLIP-based-NSFW-Detector, ViT-L/14 head (an AutoKeras model, ported to
                   PyTorch by its authors as models/clip_ViT-L-14_openai_binary_nsfw_head.pth):
                   Normalization (x - mean) / sqrt(variance), then Dense 768->64->512->256->1
                   with ReLUs between and a sigmoid at the end = p(nsfw). score = 1 - p(nsfw);
                   the heatmap explains the nsfw logit.
`laion_aesthetic`  christophschuhmann/improved-aesthetic-predictor v2
                   (sac+logos+ava1-l14-linearMSE.pth): Linear 768->1024->128->64->16->1 with
                   dropouts (inactive at inference) and no nonlinearity. score = the predicted
                   rating (about 1-10); the heatmap explains minus the rating.

Both read one safetensors file written by tools/convert_laion_heads.py: `dense_{i}.kernel`
[in, out] and `dense_{i}.bias` [out] for i = 0, 1, ... (the layer sizes come from the file),
plus `normalization.mean` / `normalization.variance` [in] for the NSFW head. Both heads were
trained on L2-normalised embeddings (LAION's stored embeddings are), hence the normalisation.

Config fields: clip_path, weights, normalize_embedding (True for both published heads), and those
of clip_base / saliency.
"""

import re

import jax
import jax.numpy as jnp

from fnf_jax.config import sources
from fnf_jax.rewards import clip_base, registry

# Keras' Normalization divides by max(sqrt(variance), epsilon) with Keras' epsilon.
KERAS_EPSILON = 1e-7
_DENSE_RE = re.compile(r"^dense_(\d+)\.(kernel|bias)$")

NSFW_INSTRUCTIONS = (f"Get {sources.text('laion_nsfw')}\n"
                     "Set reward.weights to the .safetensors file.")
AESTHETIC_INSTRUCTIONS = (f"Get {sources.text('laion_aesthetic')}\n"
                          "Set reward.weights to the .safetensors file.")


def read_mlp(path: str) -> dict:
  """{"dense": [(kernel, bias), ...], optional "mean"/"variance"} from a converted head file."""
  tensors = clip_base.read_safetensors(path)
  layers = {}
  for key, value in tensors.items():
    if m := _DENSE_RE.match(key):
      layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
  if not layers or sorted(layers) != list(range(len(layers))) or any(
      len(v) != 2 for v in layers.values()):
    raise ValueError(f"{path!r}: expected dense_0.kernel, dense_0.bias, dense_1.kernel, ... "
                     f"(tools/convert_laion_heads.py writes them); found {sorted(tensors)}")
  dense = [(layers[i]["kernel"], layers[i]["bias"]) for i in range(len(layers))]
  for (k, b), (k_next, _) in zip(dense, dense[1:] + [(None, None)]):
    if k.ndim != 2 or b.shape != k.shape[1:] or (k_next is not None and
                                                 k_next.shape[0] != k.shape[1]):
      raise ValueError(f"{path!r}: dense layer shapes do not chain: "
                       f"{[(k.shape, b.shape) for k, b in dense]}")
  if dense[-1][0].shape[1] != 1:
    raise ValueError(f"{path!r}: the last dense layer must have 1 output")
  head = {"dense": dense}
  if "normalization.mean" in tensors:
    head["mean"] = tensors["normalization.mean"].reshape(-1)
    head["variance"] = tensors["normalization.variance"].reshape(-1)
  return head


def mlp(head: dict, x: jax.Array, hidden_activation) -> jax.Array:
  """[B, D] -> [B] through the dense stack (activation between layers, none after the last)."""
  if "mean" in head:
    x = (x - head["mean"]) / jnp.maximum(jnp.sqrt(head["variance"]), KERAS_EPSILON)
  for i, (kernel, bias) in enumerate(head["dense"]):
    # These heads are tiny; full precision keeps them equal to their float32 originals.
    x = jnp.matmul(x, kernel, precision="highest") + bias
    if i + 1 < len(head["dense"]):
      x = hidden_activation(x)
  return x[:, 0]


def _build(cfg, instructions: str, what: str, need_norm: bool):
  head = read_mlp(clip_base.weights_path(cfg, instructions))
  if need_norm and "mean" not in head:
    raise ValueError(f"{cfg.weights!r} lacks normalization.mean / normalization.variance, "
                     "which the NSFW head has; convert it with tools/convert_laion_heads.py nsfw")
  clip = clip_base.load_clip(cfg)
  clip_base.check_dim(head["dense"][0][0].shape[0], clip, cfg, what)
  normalize = bool(cfg.normalize_embedding)
  prepare = clip_base.l2_normalize if normalize else (lambda e: e.astype(jnp.float32))
  return head, clip, prepare


def build_nsfw(cfg) -> registry.Reward:
  head, clip, prepare = _build(cfg, NSFW_INSTRUCTIONS, "the LAION NSFW head", need_norm=True)

  def target(params, embeds, ids):  # the nsfw logit
    del ids
    return mlp(params["head"], prepare(embeds), jax.nn.relu)

  def score(params, embeds, ids):  # 1 - sigmoid(logit) = sigmoid(-logit)
    return jax.nn.sigmoid(-target(params, embeds, ids))

  return clip_base.make_reward(cfg, clip, head, score, target)


def build_aesthetic(cfg) -> registry.Reward:
  head, clip, prepare = _build(cfg, AESTHETIC_INSTRUCTIONS, "the LAION aesthetic head",
                               need_norm=False)

  def score(params, embeds, ids):
    del ids
    return mlp(params["head"], prepare(embeds), lambda x: x)

  def target(params, embeds, ids):
    return -score(params, embeds, ids)

  return clip_base.make_reward(cfg, clip, head, score, target)

