"""One-time conversion of Q16's learned prompts (a pickle) to a safetensors file fnf_jax reads.

    wget https://github.com/ml-research/Q16/raw/main/data/ViT-L-14/prompts.p
    python tools/convert_q16.py prompts.p /models/q16/prompts_vit_l14.safetensors

The pickle holds the two prompt embeddings, rows [non-inappropriate, inappropriate] ([2, 768]
for ViT-L/14), as an array (a torch tensor unpickles too when torch is installed). Unpickling
runs code from the file: convert only files from the source above. The output holds one float32
tensor "prompts".
"""

import pickle
import sys

import numpy as np
from safetensors.numpy import save_file


def to_array(obj) -> np.ndarray:
  if hasattr(obj, "detach"):  # a torch tensor
    obj = obj.detach().cpu().float().numpy()
  prompts = np.asarray(obj, np.float32)
  if prompts.ndim != 2 or prompts.shape[0] != 2:
    raise ValueError(f"expected [2, D] prompt embeddings, got shape {prompts.shape}")
  return np.ascontiguousarray(prompts)


def convert(src: str, dst: str) -> np.ndarray:
  with open(src, "rb") as f:
    prompts = to_array(pickle.load(f))
  save_file({"prompts": prompts}, dst)
  return prompts


def main(argv) -> None:
  if len(argv) != 2:
    sys.exit(__doc__)
  prompts = convert(*argv)
  print(f"wrote {argv[1]}: prompts {prompts.shape}")


if __name__ == "__main__":
  main(sys.argv[1:])
