"""Pickle weight files (torch.save's .bin / .pt / .pth / .ckpt), recognised to be refused.

fnf_jax reads weights from safetensors only: unpickling a file runs whatever code it holds. A
pickle given where a safetensors file is expected gets a message with the one-line command that
converts it, rather than "not a readable safetensors file" (fnf_jax/models/lora_io.py).
"""

import os

from fnf_jax.models import convert

SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# torch.save's zip container (torch >= 1.6), and a bare pickle's PROTO opcode (protocols 2-5).
_HEADS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def is_pickle(path: str) -> bool:
  """By its name, or by its first bytes (a file renamed to .safetensors)."""
  if path.lower().endswith(SUFFIXES):
    return True
  with open(path, "rb") as f:
    return f.read(4).startswith(_HEADS)


def conversion_command(path: str) -> tuple[str, str]:
  """(the shell command converting `path` to safetensors, the file it writes): torch's
  weights_only loader (which refuses arbitrary objects) and safetensors' writer."""
  stem, suffix = os.path.splitext(path)
  out = stem + (".converted" if suffix == ".safetensors" else "") + ".safetensors"
  code = (f"import torch, safetensors.torch as st; sd = torch.load({path!r}, map_location='cpu',"
          " weights_only=True); st.save_file({k: v.contiguous() for k, v in sd.items()}, "
          f"{out!r})")
  return f'python -c "{code}"', out


def refuse(path: str, where: str) -> None:
  """Raises convert.CheckpointError with the conversion command if `path` is a pickle."""
  if not is_pickle(path):
    return
  command, out = conversion_command(path)
  raise convert.CheckpointError(
      f"{where}: a pickle file (torch.save's format); pickle files are not loaded (they can "
      f"run code); convert it to safetensors with: {command} and use {out}")


def read_safetensors(path: str, where: str) -> dict:
  """convert.read_state_dict of one file, where a pickle fails with the conversion command
  rather than "not a readable safetensors file"."""
  try:
    return convert.read_state_dict([path])
  except convert.CheckpointError:
    refuse(path, where)
    raise
