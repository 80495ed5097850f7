"""One-time conversion of the public RAHF checkpoint (PyTorch, multi-head) to the safetensors
file the `rahf_*` rewards read (fnf_jax's layout: fnf_jax/models/rahf.py).

    python tools/convert_rahf.py RAHF_CHECKPOINT.pth --vit /models/vit-large-patch16-384 \
        --t5 /models/t5-base --out /models/rahf/rahf.safetensors

The checkpoint is the multi-head model of github youweiliang/RichHF (its README links it on a
file host; ViT google/vit-large-patch16-384 + t5-base). --vit and --t5 are the transformers
folders of those two models: their config.json files say how large each part is (their weights
are not read: the checkpoint holds the fine-tuned ViT and T5). The T5 decoder, which only the
misaligned-word output uses, is dropped.

Needs torch (`pip install -e '.[test]'` brings it); fnf_jax itself never imports it. The file
is read with torch.load(weights_only=True), which unpickles tensors and plain containers only;
still, convert only files from a source you trust. Every tensor is checked against the shapes
the folders' configs imply, and the output is read back and compared before the command ends.
"""

import argparse
import os
import sys

import jax
import numpy as np
from flax import traverse_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_jax.models import convert  # noqa: E402  pylint: disable=g-import-not-at-top
from fnf_jax.models import rahf  # noqa: E402  pylint: disable=g-import-not-at-top
from fnf_jax.models import rahf_convert  # noqa: E402  pylint: disable=g-import-not-at-top
from fnf_jax.models import t5  # noqa: E402  pylint: disable=g-import-not-at-top
from fnf_jax.models import vit  # noqa: E402  pylint: disable=g-import-not-at-top

# Containers a training script may have wrapped the state dict in.
WRAPPERS = ("state_dict", "model_state_dict", "model")


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top  # a one-time tool: torch only here

  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in WRAPPERS:
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not obj:
    raise convert.CheckpointError(f"{path}: expected a state dict (or one under "
                                  f"{list(WRAPPERS)}), found {type(obj).__name__}")
  return {k: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in obj.items() if hasattr(v, "shape")}


def model_config(vit_folder: str, t5_folder: str, state_dict: dict) -> rahf.RAHFConfig:
  vit_raw, t5_raw = convert.read_config(vit_folder), convert.read_config(t5_folder)
  for folder, raw, kind in ((vit_folder, vit_raw, "vit"), (t5_folder, t5_raw, "t5")):
    if raw.get("model_type") != kind:
      raise convert.CheckpointError(f"{folder}/config.json has model_type "
                                    f"{raw.get('model_type')!r}, expected {kind!r}")
  return rahf.RAHFConfig(vit.ViTConfig.from_dict(vit_raw), t5.T5Config.from_dict(t5_raw),
                         rahf_convert.heads_in_state_dict(state_dict))


def convert_file(src: str, vit_folder: str, t5_folder: str, dst: str) -> dict:
  state_dict = read_checkpoint(src)
  config = model_config(vit_folder, t5_folder, state_dict)
  params = rahf_convert.convert_state_dict(state_dict, config, where=src)
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  rahf.save(dst, params, config.heads, {"source": os.path.basename(src),
                                        "vit": os.path.basename(os.path.normpath(vit_folder)),
                                        "t5": os.path.basename(os.path.normpath(t5_folder))})
  back = rahf.load(dst, config, where_vit=vit_folder, where_t5=t5_folder)
  a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(back)
  if a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a):
    raise RuntimeError(f"{dst}: the file read back differs from what was written")
  return params


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("checkpoint", help="the RAHF PyTorch checkpoint (.pth / .pt / .bin)")
  parser.add_argument("--vit", required=True, help="transformers ViT folder (config.json)")
  parser.add_argument("--t5", required=True, help="transformers T5 folder (config.json)")
  parser.add_argument("--out", required=True, help="output .safetensors file")
  args = parser.parse_args(argv)
  if not args.out.endswith(".safetensors"):
    parser.error(f"--out {args.out!r} must end in .safetensors")
  params = convert_file(args.checkpoint, args.vit, args.t5, args.out)
  count = sum(np.size(v) for v in jax.tree.leaves(params))
  print(f"wrote {args.out}: {count:,} parameters; heads "
        f"{sorted(k for k in params if k.startswith(('heatmap_', 'score_')))}")


if __name__ == "__main__":
  main()
