"""LoRA weights in: our files, diffusers' / peft's files and a run's workdir -> our LoRA tree.

    tree, scale = lora_io.load("WORKDIR", pipe.params["unet"])     # or a .safetensors file
    images = pipe.generate(prompts, lora=tree, lora_scale=scale)   # generate(lora="WORKDIR")

`load(source, unet_params)` returns the tree of `fnf_jax.models.lora` ({"lora_a": [in, r],
"lora_b": [r, out]} float32 numpy at each LoRA'd layer, nested like the UNet's params) and the
scale s of W + s·A·B. `source` is one of
  a .safetensors file  ours (`checkpoint.export_lora_safetensors`), or diffusers' / peft's as
                       `StableDiffusionPipeline.save_lora_weights` writes it. Key styles:
                         unet.<module>.lora_A.weight [r, in] / .lora_B.weight [out, r]  (peft)
                         unet.<module>.lora.down.weight / .lora.up.weight  (diffusers < 0.25)
                         unet.<attention>.processor.to_q_lora.down.weight ...  (attention
                           processors, diffusers < 0.21)
                       the `unet.` prefix optional (peft's own state dict of the UNet has none);
                       <module> is the torch module path (down_blocks.0....attn1.to_out.0).
  a folder             a run's workdir: the LoRA of its newest complete checkpoint
                       (WORKDIR/checkpoints, read-only: a run may be writing there; alpha from
                       the settings saved with it, else WORKDIR/config.json), or
                       WORKDIR/lora.safetensors when it holds no checkpoint; else a folder
                       holding one LoRA file (`FILE_NAMES`).
Pickle files (.bin, .pt, .ckpt, .pth: torch.save's) are refused with the command that converts
them (fnf_jax/models/pickles.py): unpickling can run any code the file holds.
Alpha, first found: per-module `<module>.alpha` scalars (kohya-converted files); diffusers'
`lora_adapter_metadata` JSON (unet.lora_alpha, unet.alpha_pattern, unet.use_rslora: then
s = alpha / sqrt(r)); our `alpha` metadata; none: alpha = r (s = 1, as diffusers assumes), with
a warning. Layers whose scales differ (peft's alpha / rank patterns) get theirs folded into B,
and s = 1.

Every layer is checked against `unet_params` before anything is returned: a module the UNet
does not have, a conv layer (our LoRA is on Dense kernels only) or A / B shapes that do not fit
the base kernel raise ValueError naming the first such key (in sorted order) with the LoRA's and
the base weight's shapes. Text-encoder keys (`text_encoder.`, `text_encoder_2.`) and kohya's
`lora_unet_*` / `lora_te_*` names are refused: fnf_jax fine-tunes and applies the UNet only.
`load_tree` checks a tree given in memory the same way.
"""

import dataclasses
import json
import math
import os
import re
import struct
from typing import Any

import flax.linen as nn
import numpy as np
from absl import logging
from flax import traverse_util

from fnf_jax.config.errors import ConfigError
from fnf_jax.models import convert
from fnf_jax.models import lora as lora_lib
from fnf_jax.models import pickles

# A folder's LoRA file, by name: ours (the training run's export), then diffusers'.
FILE_NAMES = ("lora.safetensors", "pytorch_lora_weights.safetensors")

# (regex on a key without its "unet." prefix, the part): module path in group 1.
_KEY_STYLES = (
    (re.compile(r"^(.+)\.lora_A\.weight$"), "a"),
    (re.compile(r"^(.+)\.lora_B\.weight$"), "b"),
    (re.compile(r"^(.+)\.lora\.down\.weight$"), "a"),
    (re.compile(r"^(.+)\.lora\.up\.weight$"), "b"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
)
# Attention processors' keys: <attention>.processor.to_out_lora.up.weight -> <attention>.to_out.0.
_PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class Weights:
  """What a source holds: the file's own A and B (our layout) and each layer's rank and scale."""
  tree: dict
  ranks: dict  # layer path (tuple) -> r
  scales: dict  # layer path -> s of W + s·A·B
  alpha: float | None  # the alpha found (None: the layers' alphas differ)
  where: str

  @property
  def rank(self) -> int | None:
    """The rank every layer has, or None when they differ."""
    return _only(self.ranks.values())

  def single_scale(self) -> tuple[dict, float]:
    """(tree, s) with one s for all layers: the layers' own when they agree, else each layer's
    folded into its B (and s = 1)."""
    scale = _only(self.scales.values())
    if scale is not None:
      return self.tree, scale
    logging.info("%s: the layers' scales differ (%s ... %s): folded into lora_b, scale 1",
                 self.where, min(self.scales.values()), max(self.scales.values()))
    flat = traverse_util.flatten_dict(self.tree)
    folded = {p: v * np.float32(self.scales[p[:-1]]) if p[-1] == "lora_b" else v
              for p, v in flat.items()}
    return traverse_util.unflatten_dict(folded), 1.0


def load(source: str | os.PathLike, unet_params: Any, *, where: str = "") -> tuple[dict, float]:
  """(LoRA tree, scale) of `source` (a file or folder: see the module docstring), checked
  against `unet_params` (the UNet's params, or their shapes). `where` names it in errors."""
  return read(source, unet_params, where=where).single_scale()


def read(source: str | os.PathLike, unet_params: Any, *, where: str = "") -> Weights:
  """`load` without merging the scales: the source's A, B, ranks and scales as stored (what
  training from a LoRA needs: lora.init)."""
  source = os.fspath(source)
  where = where or source
  if os.path.isdir(source):
    return _read_folder(source, unet_params, where)
  if not os.path.isfile(source):
    raise FileNotFoundError(f"{where}: no such LoRA file or folder")
  tensors = pickles.read_safetensors(source, where)  # a pickle is named as such
  return _from_state_dict(tensors, _metadata(source), unet_params, where)


def load_tree(tree: dict, unet_params: Any, *, scale: float,
              where: str = "lora") -> tuple[dict, float]:
  """(tree, scale) of a LoRA tree given in memory, once every layer is checked against
  `unet_params` (a layer the UNet does not have, or A / B that do not fit its kernel, raises
  ValueError naming the layer and both shapes)."""
  try:
    value = float(scale) if not isinstance(scale, bool) else math.nan
  except (TypeError, ValueError):
    value = math.nan
  if not math.isfinite(value):
    raise ValueError(f"{where}: the LoRA scale must be a finite number (alpha / rank), "
                     f"got {scale!r}")
  _layers(tree, unet_params, where)
  return tree, value


# --- files ------------------------------------------------------------------------------------
def _metadata(path: str) -> dict:
  """The safetensors header's __metadata__ (strings), read without the tensors."""
  with open(path, "rb") as f:
    size = struct.unpack("<Q", f.read(8))[0]
    return dict(json.loads(f.read(size)).get("__metadata__") or {})


def _module_and_part(key: str, where: str) -> tuple[str, str]:
  """("down_blocks.0....to_q", "a" | "b" | "alpha") of a LoRA file's key."""
  if key.startswith(_TEXT_PREFIXES):
    raise ValueError(f"{where}: {key!r} is a text-encoder LoRA layer; fnf_jax fine-tunes and "
                     "applies the UNet only. Use a LoRA of the UNet alone (diffusers: "
                     "save_lora_weights(..., unet_lora_layers=...) without text_encoder_lora_"
                     "layers), or drop the text_encoder.* keys")
  if key.startswith(("lora_unet_", "lora_te")):
    raise ValueError(f"{where}: {key!r} is a kohya / A1111 key, which fnf_jax does not read. "
                     "Convert the file with diffusers (pipe.load_lora_weights(FILE); "
                     "StableDiffusionPipeline.save_lora_weights(DIR, unet_lora_layers="
                     "get_peft_model_state_dict(pipe.unet)))")
  name = key.removeprefix("unet.").removeprefix(_PEFT_PREFIX)
  processor = _PROCESSOR.match(name)
  if processor:
    attention, proj, kind = processor.groups()
    return f"{attention}.{proj}{'.0' if proj == 'to_out' else ''}", "a" if kind == "down" else "b"
  for pattern, part in _KEY_STYLES:
    match = pattern.match(name)
    if match:
      return match.group(1), part
  raise ValueError(f"{where}: key {key!r} is not a LoRA weight fnf_jax reads (expected "
                   "unet.<module>.lora_A.weight / .lora_B.weight, .lora.down / .lora.up, or "
                   "<module>.alpha; DoRA's magnitude vectors and LoRA biases are not supported)")


def _from_state_dict(tensors: dict, metadata: dict, unet_params, where: str) -> Weights:
  if not tensors:
    raise ValueError(f"{where}: the file holds no tensors")
  modules: dict[str, dict] = {}
  for key in sorted(tensors):
    module, part = _module_and_part(key, where)
    modules.setdefault(module, {})[part] = (key, tensors[key])
  base = traverse_util.flatten_dict(nn.meta.unbox(unet_params))
  tree, ranks, alphas, names = {}, {}, {}, {}
  for module in sorted(modules):
    parts = modules[module]
    missing = [p for p in ("a", "b") if p not in parts]
    if missing:
      key = next(iter(parts.values()))[0]
      raise ValueError(f"{where}: {key!r} has no lora_{'B' if missing == ['b'] else 'A'} "
                       f"partner for module {module!r}")
    layer = _layer(module, parts, base, where)
    if layer in names:
      raise ValueError(f"{where}: modules {names[layer]!r} and {module!r} are the same layer")
    names[layer] = module
    (_, a), (_, b) = parts["a"], parts["b"]
    tree[layer + ("lora_a",)] = np.ascontiguousarray(np.asarray(a, np.float32).T)
    tree[layer + ("lora_b",)] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    ranks[layer] = int(a.shape[0])
    if "alpha" in parts:
      alphas[layer] = float(np.asarray(parts["alpha"][1]).reshape(()))
  if alphas and len(alphas) != len(ranks):
    raise ValueError(f"{where}: {len(alphas)} of {len(ranks)} LoRA modules have an .alpha "
                     "tensor; expected all or none")
  scales, alpha = _scales(ranks, alphas, metadata, names, where)
  return Weights(traverse_util.unflatten_dict(tree), ranks, scales, alpha, where)


def _layer(module: str, parts: dict, base: dict, where: str) -> tuple[str, ...]:
  """The Flax path of `module`, once A [r, in] and B [out, r] are checked against its kernel."""
  layer = convert.flax_path(module + ".weight")[:-1]
  (key_a, a), (key_b, b) = parts["a"], parts["b"]
  kernel = base.get(layer + ("kernel",))
  if kernel is None:
    raise ValueError(f"{where}: {key_a!r} (shape {tuple(a.shape)}) is for module {module!r}, "
                     f"which the UNet does not have (no {'/'.join(layer)}/kernel). Is this a "
                     "LoRA of this model?")
  shape = tuple(np.shape(kernel))
  if len(shape) != 2:
    raise ValueError(f"{where}: {key_a!r} (shape {tuple(a.shape)}) is on {module!r}, whose base "
                     f"weight is a conv kernel {shape}: only LoRA on Linear layers is supported")
  d_in, d_out = shape
  torch_shape = (d_out, d_in)
  if a.ndim != 2 or a.shape[1] != d_in:
    raise ValueError(f"{where}: {key_a!r} has shape {tuple(a.shape)}, which does not fit the "
                     f"UNet's {module}.weight {torch_shape}: lora_A must be [r, {d_in}]")
  if b.ndim != 2 or b.shape != (d_out, a.shape[0]):
    raise ValueError(f"{where}: {key_b!r} has shape {tuple(b.shape)}, which does not fit the "
                     f"UNet's {module}.weight {torch_shape} with lora_A {tuple(a.shape)}: "
                     f"lora_B must be [{d_out}, {a.shape[0]}]")
  return layer


def _scales(ranks: dict, alphas: dict, metadata: dict, modules: dict,
            where: str) -> tuple[dict, float | None]:
  """({layer: s}, the one alpha or None) from the first alpha source found."""
  adapter = json.loads(metadata["lora_adapter_metadata"]) if metadata.get(
      "lora_adapter_metadata") else {}
  if adapter.get("unet.use_dora"):
    raise ValueError(f"{where}: a DoRA adapter (use_dora); only plain LoRA is supported")
  root = (lambda r: math.sqrt(r)) if adapter.get("unet.use_rslora") else (lambda r: r)
  if alphas:
    how = "its .alpha tensors"
  elif "unet.lora_alpha" in adapter:
    patterns = adapter.get("unet.alpha_pattern") or {}
    alphas = {layer: float(_pattern(patterns, modules[layer], adapter["unet.lora_alpha"]))
              for layer in ranks}
    how = "lora_adapter_metadata"
  elif "alpha" in metadata:
    alphas = {layer: float(metadata["alpha"]) for layer in ranks}
    how = "its alpha metadata"
  else:
    alphas = {layer: float(r) for layer, r in ranks.items()}
    logging.warning("%s: no alpha (no lora_adapter_metadata, alpha metadata or .alpha tensors): "
                    "assuming alpha = rank = %s, scale 1, as diffusers does", where,
                    _only(ranks.values()) or sorted(set(ranks.values())))
    how = "alpha = rank"
  scales = {layer: alphas[layer] / root(ranks[layer]) for layer in ranks}
  alpha = _only(alphas.values())
  logging.info("%s: %d LoRA layers, rank %s, alpha %s (%s)", where, len(ranks),
               _only(ranks.values()) or "per layer", alpha if alpha is not None else "per layer",
               how)
  return scales, alpha


def _pattern(patterns: dict, module: str, default):
  """peft's alpha_pattern / rank_pattern lookup: the first pattern that ends `module`."""
  for pattern, value in patterns.items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return value
  return default


def _only(values):
  values = set(values)
  return values.pop() if len(values) == 1 else None


# --- folders ----------------------------------------------------------------------------------
def _read_folder(folder: str, unet_params, where: str) -> Weights:
  checkpoints = os.path.join(folder, "checkpoints")
  if os.path.isdir(checkpoints):
    from fnf_jax.runtime import checkpoint  # pylint: disable=import-outside-toplevel  # orbax: only here
    newest = checkpoint.read_newest(checkpoints, ("train", "lora"))
    if newest is not None:
      return _from_checkpoint(folder, *newest, unet_params, where)
  for name in FILE_NAMES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return read(path, unet_params, where=path if where == folder else f"{where}/{name}")
  raise FileNotFoundError(f"{where}: a folder with no LoRA: neither checkpoints/ with a complete "
                          f"checkpoint (a training run's workdir) nor any of {FILE_NAMES}")


def _from_checkpoint(folder: str, step: int, tree: dict, unet_params, where: str) -> Weights:
  where = f"{where} (checkpoint step {step})"
  ranks = _layers(tree, unet_params, where)
  alpha, source = _workdir_alpha(folder, step)
  if alpha is None:
    alphas = {layer: float(r) for layer, r in ranks.items()}
    logging.warning("%s: no lora.alpha in the checkpoint's settings or %s/config.json: "
                    "assuming alpha = rank (scale 1)", where, folder)
  else:
    alphas = {layer: alpha for layer in ranks}
  logging.info("%s: %d LoRA layers, rank %s, alpha %s (%s)", where, len(ranks),
               _only(ranks.values()), _only(alphas.values()), source)
  tree = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(tree).items()}
  return Weights(traverse_util.unflatten_dict(tree), ranks,
                 {layer: alphas[layer] / ranks[layer] for layer in ranks},
                 _only(alphas.values()), where)


def _workdir_alpha(folder: str, step: int) -> tuple[float | None, str]:
  """(lora.alpha, where from): the settings saved with the checkpoint (what its weights were
  trained with), else the run's config.json (a checkpoint saved before settings were kept)."""
  from fnf_jax.runtime import checkpoint  # pylint: disable=import-outside-toplevel
  try:  # None (no settings saved) or unreadable: the run's record may still say
    settings = checkpoint.read_settings(os.path.join(folder, "checkpoints"), step)
    return float(settings["lora"]["alpha"]), "the checkpoint's settings"
  except (ValueError, KeyError, TypeError):
    pass
  try:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
      return float(json.load(f)["lora"]["alpha"]), "the run's config.json"
  except (OSError, ValueError, KeyError, TypeError):
    return None, ""


# --- trees ------------------------------------------------------------------------------------
def _layers(tree: dict, unet_params, where: str) -> dict:
  """{layer path: rank} of a LoRA tree, every layer checked against the UNet's kernel."""
  if not isinstance(tree, dict) or not tree:
    raise ValueError(f"{where}: a LoRA tree is a non-empty nested dict, got "
                     f"{type(tree).__name__}")
  flat = traverse_util.flatten_dict(tree)
  base = traverse_util.flatten_dict(nn.meta.unbox(unet_params))
  ranks = {}
  for path in sorted(flat):
    layer, leaf = path[:-1], path[-1]
    if leaf not in ("lora_a", "lora_b"):
      raise ValueError(f"{where}: {'/'.join(path)}: a LoRA layer holds lora_a and lora_b only")
    if layer in ranks:
      continue
    name = "/".join(layer)
    if layer + ("lora_a",) not in flat or layer + ("lora_b",) not in flat:
      raise ValueError(f"{where}: LoRA layer {name} needs both lora_a and lora_b")
    a, b = np.shape(flat[layer + ("lora_a",)]), np.shape(flat[layer + ("lora_b",)])
    kernel = base.get(layer + ("kernel",))
    if kernel is None:
      raise ValueError(f"{where}: LoRA layer {name} (lora_a {a}) is not a layer of the UNet "
                       f"(no {name}/kernel)")
    shape = tuple(np.shape(kernel))
    if len(shape) != 2 or len(a) != 2 or len(b) != 2 or a[0] != shape[0] or \
        b != (a[1], shape[1]):
      raise ValueError(f"{where}: LoRA layer {name}: lora_a {a} / lora_b {b} do not fit the "
                       f"UNet's kernel {shape} [in, out] (expected [{shape[0]}, r] / "
                       f"[r, {shape[-1]}])")
    ranks[layer] = int(a[1])
  return ranks


# --- lora.init: the LoRA a training run starts from ------------------------------------------
def start(lora_cfg, unet_params) -> dict | None:
  """The LoRA tree of lora.init (None for ""), once its rank and layers are checked against
  config.lora: a mismatch raises ConfigError naming both, before anything compiles.
  The file's A and B are taken as they are; config.lora.alpha sets the scale."""
  if not lora_cfg.init:
    return None
  key = f"config.lora.init = {lora_cfg.init!r}"
  try:
    weights = read(lora_cfg.init, unet_params, where=key)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if weights.rank != lora_cfg.rank:
    layer, rank = next((l, r) for l, r in sorted(weights.ranks.items()) if r != lora_cfg.rank)
    shape = np.shape(_at(weights.tree, layer)["lora_a"])
    raise ConfigError(
        f"{key}: layer {'/'.join(layer)} has rank {rank} (lora_a {shape} [in, r]), but "
        f"config.lora.rank = {lora_cfg.rank} needs {(shape[0], lora_cfg.rank)}: set "
        f"--config.lora.rank={rank} (and lora.alpha), or start from a LoRA of rank "
        f"{lora_cfg.rank}")
  wanted = {p[:-1] for p in lora_lib.targets(unet_params, lora_cfg.targets)}
  have = set(weights.ranks)
  if have != wanted:
    name = lambda layers: ", ".join("/".join(l) for l in sorted(layers)[:3])
    raise ConfigError(
        f"{key}: its layers are not those config.lora.targets = {lora_cfg.targets!r} selects: "
        f"{len(have - wanted)} in the file only (e.g. {name(have - wanted) or '-'}), "
        f"{len(wanted - have)} selected but not in the file (e.g. {name(wanted - have) or '-'})."
        " Set lora.targets to the file's layers")
  scale = lora_lib.scale(lora_cfg.rank, lora_cfg.alpha)
  file_scale = weights.single_scale()[1]
  logging.info("%s: training starts from its %d layers (rank %d; the file's alpha %s, scale "
               "%.4g); config.lora.alpha = %g applies: scale %.4g", key, len(have),
               weights.rank, weights.alpha, file_scale, lora_cfg.alpha, scale)
  if not np.isclose(file_scale, scale):
    logging.warning("%s: the file's scale %.4g is not config.lora.alpha / rank = %.4g: step 0 "
                    "is not the file's model (its A, B with another scale)", key, file_scale,
                    scale)
  return weights.tree


def _at(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree
