"""Merge a LoRA into a Stable Diffusion folder's UNet: a full diffusers folder, no torch needed.

    python tools/merge_lora.py /models/stable-diffusion-v1-5 /runs/violence \
        --out /models/sd15-violence-fixed

PIPELINE_FOLDER is a diffusers-format folder (SD 1.x, 2.x or SDXL, safetensors). LORA is
anything fnf_jax/models/lora_io.py reads: a run's workdir (the LoRA of its newest checkpoint),
our lora.safetensors, or a diffusers / peft LoRA file. The output is a copy of PIPELINE_FOLDER
whose unet/ holds W + s·A·B (float32; s = alpha / rank from the LoRA, or --scale), so that

    StableDiffusionPipeline.from_pretrained(OUT)        # diffusers, no LoRA loading
    fnf_jax.diffusion.pipeline.load(OUT)                          # or --config.model.path=OUT

sample the fine-tuned model. The merged UNet is checked against unet/config.json before
anything is written, and the folder appears whole or not at all; an existing --out is replaced
only with --overwrite (and only if it holds a pipeline).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_jax.models import export  # noqa: E402  pylint: disable=g-import-not-at-top
from fnf_jax.models import lora as lora_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from fnf_jax.models import lora_io  # noqa: E402  pylint: disable=g-import-not-at-top
from fnf_jax.models import unet as unet_lib  # noqa: E402  pylint: disable=g-import-not-at-top


def merge(pipeline_folder: str, lora: str, out: str, *, scale: float | None = None,
          overwrite: bool = False) -> str:
  """Writes OUT (see the module docstring); returns its path."""
  if os.path.exists(out) and not overwrite:  # before minutes of reading (checked again there)
    raise FileExistsError(f"{out!r} exists; pass --overwrite to replace it")
  # Only the UNet is read (the other components are copied as files), in float32.
  _, unet_params = unet_lib.load(os.path.join(pipeline_folder, "unet"), dtype="float32")
  tree, file_scale = lora_io.load(lora, unet_params)
  scale = file_scale if scale is None else scale
  merged = lora_lib.merge(unet_params, tree, scale=scale)
  return export.replace_unet(pipeline_folder, out, unet_params=merged, overwrite=overwrite)


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("pipeline_folder", help="a diffusers-format Stable Diffusion folder")
  parser.add_argument("lora", help="a LoRA file or a training run's workdir")
  parser.add_argument("--out", required=True, help="the merged pipeline folder to write")
  parser.add_argument("--scale", type=float, default=None,
                      help="s of W + s·A·B (default: the LoRA's alpha / rank)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  try:
    out = merge(args.pipeline_folder, args.lora, args.out, scale=args.scale,
                overwrite=args.overwrite)
  except (ValueError, OSError) as e:  # the messages name the file, the key and the shapes
    sys.exit(f"merge_lora: {e}")
  print(f"wrote {out}: {args.pipeline_folder} with {args.lora} merged into its UNet")


if __name__ == "__main__":
  main(sys.argv[1:])
