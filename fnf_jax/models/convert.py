"""PyTorch-format checkpoints (diffusers / transformers folders) -> Flax parameter trees.

Our modules name their submodules after the PyTorch modules they mirror, with list indices
joined by an underscore, so one rule maps almost every key:

    down_blocks.0.resnets.1.conv1.weight  ->  down_blocks_0/resnets_1/conv1/kernel

and the tensor layout follows from the Flax leaf it lands on: a Linear weight [out, in] becomes
a Dense kernel [in, out]; a Conv2d weight [O, I, kh, kw] becomes an NHWC Conv kernel
[kh, kw, I, O]; norm weights become `scale`; embedding weights `embedding`. A family with a key
that does not fit passes `rename` rules (regex, replacement) applied to the PyTorch key first.

The target tree comes from `jax.eval_shape` of the module's init, so every shape is checked
against what the config asks for, and a mismatch names the key and both shapes.
"""

import json
import os
import re
import struct
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from fnf_jax.config import errors

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_INDEX_RE = re.compile(r"\.(\d+)(?=\.|$)")
_LIST_ENTRY = re.compile(r"^(.+)_(\d+)$")
# Module names that end in _<digit> but are not list entries (diffusers' TimestepEmbedding).
# `flax_path` sends `linear.1` and `linear_1` to the same Flax name; only this list tells them
# apart on the way back (diffusers' loading of our exports, tested, guards it).
GENUINE_NAMES = ("linear_1", "linear_2")


class CheckpointError(errors.ConfigError):
  """A checkpoint folder or file is missing, in the wrong format, or disagrees with its config:
  a bad input, which `python -m fnf_jax.main` reports in one FATAL line (exit 2)."""


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isdir(folder):
    raise CheckpointError(f"model folder not found: {folder!r}. Expected a diffusers-format "
                          "component folder holding config.json and *.safetensors.")
  if not os.path.isfile(path):
    raise CheckpointError(f"missing {path!r}: every component folder needs its config.json.")
  with open(path) as f:
    return json.load(f)


def find_weights(folder: str) -> list[str]:
  """Paths of the safetensors file(s) of one component folder (single file or sharded index)."""
  if not os.path.isdir(folder):
    raise CheckpointError(f"model folder not found: {folder!r}")
  for stem in WEIGHT_NAMES:
    for variant in ("", ".fp16"):
      single = os.path.join(folder, f"{stem}{variant}.safetensors")
      if os.path.isfile(single):
        return [single]
      index = single + ".index.json"
      if os.path.isfile(index):
        with open(index) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(folder, s) for s in shards]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
          raise CheckpointError(f"{index!r} lists shards that are missing: {missing}")
        return paths
  present = sorted(os.listdir(folder))
  if any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in present):
    raise CheckpointError(
        f"{folder!r} holds only PyTorch pickle weights ({', '.join(present)}). fnf_jax reads "
        "safetensors only (no torch at run time). Convert once, e.g.\n"
        "  python -c \"import diffusers; m = diffusers.<ModelClass>.from_pretrained('FOLDER'); "
        "m.save_pretrained('FOLDER', safe_serialization=True)\"\n"
        "or pass a checkpoint that ships *.safetensors.")
  raise CheckpointError(
      f"no weights in {folder!r}: expected one of "
      f"{[s + '.safetensors' for s in WEIGHT_NAMES]} (or a sharded *.safetensors.index.json); "
      f"found {present}")


def read_state_dict(paths: Iterable[str]) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  out = {}
  for path in paths:
    try:
      # framework="flax" keeps bfloat16 tensors (numpy has no bfloat16; ml_dtypes via jax does).
      with safe_open(path, framework="flax") as f:
        keys = list(f.keys())
        for key in keys:
          out[key] = np.asarray(f.get_tensor(key))
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # safetensors' errors omit the path
      raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                            f"{e}); download or convert it again") from e
    # NaN anywhere, or an infinity outside a mask buffer (OpenCLIP's attn_mask holds -inf by
    # design): a broken download or conversion, whose every image would come out black.
    bad = [k for k in keys if jnp.issubdtype(out[k].dtype, jnp.floating)
           and (np.isnan(out[k]).any() or (not k.endswith("mask")
                                           and not np.isfinite(out[k]).all()))]
    if bad:
      raise CheckpointError(f"{path}: tensors {bad[:5]} ({len(bad)} in all) hold NaN or "
                            "infinite values; download or convert the weights again")
  return out


# numpy dtype name -> safetensors dtype tag.
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                       "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes a .safetensors file with a stable byte layout: tensors and metadata in sorted order
  (safetensors' own writer orders the metadata by a hash map, so equal inputs could give other
  bytes). Written whole under a temporary name and renamed; open() honours the umask."""
  header, chunks, offset = {}, [], 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype.name not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot "
                       f"hold (valid: {sorted(_SAFETENSORS_DTYPES)})")
    data = a.tobytes()
    header[name] = {"dtype": _SAFETENSORS_DTYPES[a.dtype.name], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for data in chunks:
      f.write(data)
  os.replace(tmp, path)


def read_component(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, state dict as numpy arrays) of one diffusers/transformers folder."""
  config = read_config(folder)
  return config, read_state_dict(find_weights(folder))


def flax_path(torch_key: str) -> tuple[str, ...]:
  """'a.b.0.c.weight' -> ('a', 'b_0', 'c', 'weight'); the leaf is renamed by `_to_flax_leaf`."""
  return tuple(_INDEX_RE.sub(r"_\1", torch_key).split("."))


def torch_key(path: Iterable[str]) -> str:
  """('down_blocks_0', 'attentions_1', 'to_out_0') -> 'down_blocks.0.attentions.1.to_out.0'.

  The inverse of `flax_path` on module paths: a segment `name_N` is a torch ModuleList /
  Sequential entry `name.N`, except GENUINE_NAMES. Used by every Flax -> PyTorch export (the
  diffusers folder writer and the LoRA file).
  """
  return ".".join(p if p in GENUINE_NAMES else _LIST_ENTRY.sub(r"\1.\2", p) for p in path)


def _candidates(path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
  """Flax leaf names a PyTorch leaf may land on, with the layout transform for each."""
  *parent, leaf = path
  parent = tuple(parent)
  if leaf == "weight":
    return [(parent + ("kernel",), "kernel"), (parent + ("scale",), None),
            (parent + ("embedding",), None)]
  return [(parent + (leaf,), None)]


def _to_flax(value: np.ndarray, how) -> np.ndarray:
  if how == "kernel":
    if value.ndim == 4:  # Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
      return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:  # Linear [out, in] -> [in, out]
      return value.T
  return value


def _torch_shape(flax_shape: tuple[int, ...], how) -> tuple[int, ...]:
  if how == "kernel" and len(flax_shape) == 4:
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if how == "kernel" and len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def to_params(state_dict: Mapping[str, np.ndarray], abstract_params: Any, *, where: str,
              rename: Iterable[tuple[str, str]] = (), ignore: Iterable[str] = (),
              dtype=np.float32) -> dict:
  """Maps a PyTorch state dict onto the (abstract) Flax params tree, checking every shape.

  Args:
    state_dict: PyTorch key -> array.
    abstract_params: the module's params as `jax.eval_shape(module.init, ...)["params"]`
      (boxed with logical names or not).
    where: the file or folder the weights came from, named in errors.
    rename: (regex, replacement) applied in order to each PyTorch key before the generic rule.
    ignore: regexes of PyTorch keys that have no parameter (buffers such as position_ids).
    dtype: dtype of the returned arrays.
  Returns:
    A nested dict of numpy arrays with exactly the structure of `abstract_params`.
  """
  target = traverse_util.flatten_dict(nn.meta.unbox(abstract_params))
  ignore = [re.compile(p) for p in ignore]
  rename = [(re.compile(p), r) for p, r in rename]
  out = {}
  unexpected = []
  for key, value in state_dict.items():
    if any(p.search(key) for p in ignore):
      continue
    renamed = key
    for pattern, repl in rename:
      renamed = pattern.sub(repl, renamed)
    for path, how in _candidates(flax_path(renamed)):
      if path in target:
        expected = tuple(target[path].shape)
        if _torch_shape(expected, how) != tuple(value.shape) or (
            how == "kernel" and value.ndim not in (2, 4)):
          raise CheckpointError(
              f"weight {key!r} in {where} has shape {tuple(value.shape)}, but the config "
              f"expects {_torch_shape(expected, how)} (PyTorch layout). Does config.json "
              "belong to these weights?")
        out[path] = np.asarray(_to_flax(value, how), dtype=dtype)
        break
    else:
      unexpected.append(key)
  if unexpected:
    raise CheckpointError(
        f"{len(unexpected)} weight(s) in {where} have no place in the model built from its "
        f"config, e.g. {unexpected[:5]}. Is this the right model class / config?")
  missing = [path for path in target if path not in out]
  if missing:
    names = [".".join(p) for p in missing[:5]]
    raise CheckpointError(
        f"{len(missing)} parameter(s) of the model are not in {where}, e.g. {names}")
  return traverse_util.unflatten_dict(out)


def abstract_params(module: nn.Module, *args, **kwargs) -> Any:
  """Shape/dtype tree of `module`'s params (with logical-axis boxes) without allocating them.

  Remembered per module (linen modules compare by their fields) and input shapes: tracing a
  model's init costs about a second, and a process builds the same models again (a run's
  setup and its pipeline, a resumed run, the tests' many tiny runs). Each call gets its own
  containers, so a caller that edits the tree changes no one else's."""
  spec = lambda x: (x.shape, np.dtype(x.dtype).str) if hasattr(x, "shape") else ("value", x)
  try:
    key = (module, tuple(map(spec, args)), tuple((k, spec(v)) for k, v in sorted(kwargs.items())))
    hash(key)
  except TypeError:  # a module with an unhashable field: traced every time
    return _abstract_params(module, args, kwargs)
  cached = _ABSTRACT.get(key)
  if cached is None:
    cached = _ABSTRACT[key] = _abstract_params(module, args, kwargs)
  return jax.tree.map(lambda leaf: leaf, cached)


_ABSTRACT: dict = {}  # (module, input specs) -> abstract params; a few entries per model family


def _abstract_params(module: nn.Module, args, kwargs) -> Any:
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return variables["params"]
