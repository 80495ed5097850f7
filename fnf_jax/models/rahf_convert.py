"""RAHF's PyTorch reimplementation's checkpoint (github youweiliang/RichHF) converted to our
parameter tree (fnf_jax/models/rahf.py): which heads it has, and each tensor renamed, transposed
(and, for the transposed convolutions, flipped) into place. Run once by tools/convert_rahf.py.
"""

import flax.linen as nn
import numpy as np
from flax import traverse_util

from fnf_jax.models import convert
from fnf_jax.models import t5 as t5_lib
from fnf_jax.models import vit as vit_lib
from fnf_jax.models.rahf import RAHFConfig, RAHFHeads, abstract_params

def _head_keys(kind: str, name: str, heads: RAHFHeads) -> dict[str, tuple[str, str]]:
  """Our "head/module" -> (the reimplementation's module prefix, "conv" | "up" | "norm" |
  "dense"), for one head. Its Sequentials interleave activations, hence the index arithmetic."""
  ours, theirs = f"{kind}_{name}", f"{kind}_predictor.{name}"
  table = {}
  if kind == "heatmap":
    for i in range(len(heads.heat_convs)):  # Conv, ReLU, Norm per layer
      table[f"{ours}/conv_{i}"] = (f"{theirs}.conv_layers.{3 * i}", "conv")
      table[f"{ours}/norm_{i}"] = (f"{theirs}.conv_layers.{3 * i + 2}", "norm")
    for i in range(len(heads.heat_ups)):
      table[f"{ours}/up_{i}"] = (f"{theirs}.deconv_layers.{i}.0", "up")
      table[f"{ours}/up_{i}_norm"] = (f"{theirs}.deconv_layers.{i}.1", "norm")
      table[f"{ours}/up_{i}_conv_a"] = (f"{theirs}.conv_layers2.{i}.0", "conv")
      table[f"{ours}/up_{i}_norm_a"] = (f"{theirs}.conv_layers2.{i}.1", "norm")
      table[f"{ours}/up_{i}_conv_b"] = (f"{theirs}.conv_layers2.{i}.3", "conv")
      table[f"{ours}/up_{i}_norm_b"] = (f"{theirs}.conv_layers2.{i}.4", "norm")
    table[f"{ours}/out_0"] = (f"{theirs}.last_conv1", "conv")
    table[f"{ours}/out_1"] = (f"{theirs}.last_conv2", "conv")
  else:
    for i in range(len(heads.score_channels(1 << 10))):  # Conv, Norm, ReLU per layer
      table[f"{ours}/conv_{i}"] = (f"{theirs}.conv_layers.{3 * i}", "conv")
      table[f"{ours}/norm_{i}"] = (f"{theirs}.conv_layers.{3 * i + 1}", "norm")
    for i in range(len(heads.score_mlp) + 1):  # Linear, ReLU per layer
      table[f"{ours}/dense_{i}"] = (f"{theirs}.linear_layers.{2 * i}", "dense")
  return table


def heads_in_state_dict(state_dict: dict) -> RAHFHeads:
  """The head names and widths of a reimplementation state dict (its multi-head layout)."""
  names = {}
  for key in state_dict:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] in ("heatmap_predictor", "score_predictor"):
      names.setdefault(parts[0], [])
      if parts[1] not in names[parts[0]]:
        names[parts[0]].append(parts[1])
  if not names.get("heatmap_predictor") or not names.get("score_predictor"):
    raise convert.CheckpointError(
        "the checkpoint has no heatmap_predictor.<name>.* / score_predictor.<name>.* weights: "
        "not the multi-head RAHF reimplementation (multi_heads=True)")

  def widths(key: str, step: int = 1, axis: int = 0) -> list[int]:
    """Dimension `axis` of key.format(step * i) for i = 0, 1, ... while that key exists (the
    Sequentials interleave activations and norms: a conv every 3 entries, a Linear every 2)."""
    out = []
    while key.format(step * len(out)) in state_dict:
      out.append(state_dict[key.format(step * len(out))].shape[axis])
    return out

  p = f"heatmap_predictor.{names['heatmap_predictor'][0]}"
  s = f"score_predictor.{names['score_predictor'][0]}"
  return RAHFHeads(scores=tuple(names["score_predictor"]),
                   heatmaps=tuple(names["heatmap_predictor"]),
                   heat_convs=tuple(widths(p + ".conv_layers.{}.weight", 3)),
                   heat_ups=tuple(widths(p + ".deconv_layers.{}.0.weight", axis=1)),
                   heat_last=state_dict[f"{p}.last_conv1.weight"].shape[0],
                   score_convs=tuple(widths(s + ".conv_layers.{}.weight", 3)),
                   score_mlp=tuple(widths(s + ".linear_layers.{}.weight", 2)[:-1]))


def convert_state_dict(state_dict: dict, config: RAHFConfig, where: str) -> dict:
  """The reimplementation's state dict (numpy arrays; keys `vit.*`, `t5.*`,
  `visual_token_projection.*`, `heatmap_predictor.<name>.*`, `score_predictor.<name>.*`) ->
  our params of `config` (every head of config.heads), checking every shape."""
  sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v)
        for k, v in state_dict.items()}
  need = [p for p in ("vit.", "t5.", "visual_token_projection.") if not any(
      k.startswith(p) for k in sd)]
  if need:
    raise convert.CheckpointError(f"{where}: no {need[0]}* weights; a RAHF checkpoint holds "
                                  "vit.*, t5.*, visual_token_projection.* and the heads")
  target = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)))
  params = {
      "vit": vit_lib.params_from_state_dict(
          {k[4:]: v for k, v in sd.items() if k.startswith("vit.")}, config.vit,
          where=f"{where} (vit.*)", add_pooling_layer=False),
      "t5": t5_lib.params_from_state_dict(
          {k[3:]: v for k, v in sd.items() if k.startswith("t5.")}, config.t5,
          where=f"{where} (t5.*)"),
  }
  flat = {("vit",) + k: v for k, v in traverse_util.flatten_dict(params["vit"]).items()}
  flat.update({("t5",) + k: v for k, v in traverse_util.flatten_dict(params["t5"]).items()})
  table = {"visual_token_projection": ("visual_token_projection", "dense")}
  for name in config.heads.heatmaps:
    table.update(_head_keys("heatmap", name, config.heads))
  for name in config.heads.scores:
    table.update(_head_keys("score", name, config.heads))
  cells = config.grid[0] * config.grid[1]
  for ours, (theirs, kind) in table.items():
    module = tuple(ours.split("/"))
    leaves = {"norm": {"scale": "scale"}}.get(kind, {"kernel": "weight", "bias": "bias"})
    for leaf, torch_leaf in leaves.items():
      key = f"{theirs}.{torch_leaf}"
      if key not in sd:
        raise convert.CheckpointError(f"{where}: missing {key!r} (for {ours}/{leaf})")
      v = sd[key]
      if kind == "norm":
        v = v.reshape(-1)  # [C, 1, 1]
      elif leaf == "kernel" and kind == "conv":
        v = v.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
      elif leaf == "kernel" and kind == "up":
        v = v[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)  # [I, O, kh, kw], flipped -> [kh, kw, I, O]
      elif leaf == "kernel":
        v = v.T
        if ours.endswith("/dense_0") and ours.startswith("score_"):
          # PyTorch flattened the [C, n, n] map channel-major; ours flattens [n, n, C].
          c = v.shape[0] // cells
          v = v.reshape(c, cells, -1).transpose(1, 0, 2).reshape(cells * c, -1)
      path = module + (leaf,)
      if path not in target or tuple(target[path].shape) != tuple(v.shape):
        expected = tuple(target[path].shape) if path in target else None
        raise convert.CheckpointError(
            f"{where}: {key!r} has shape {tuple(sd[key].shape)}, which does not fit {ours}/"
            f"{leaf} (expects {expected} in our layout): do the ViT and T5 folders belong to "
            "this checkpoint?")
      flat[path] = np.ascontiguousarray(v, np.float32)
  missing = [k for k in target if k not in flat]
  if missing:
    raise convert.CheckpointError(f"{where}: nothing maps to {['/'.join(k) for k in missing[:5]]}")
  return traverse_util.unflatten_dict(flat)
