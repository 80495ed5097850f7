"""Where each input a config names comes from: the one table that the preflight's messages, the
loaders' errors and the README's "Where to get the inputs" table say in the same words.

fnf_jax downloads nothing at run time. Each entry is what to fetch (once, on a machine with
network access) and the command that puts it where the configs look by default; copy the
result to the VM, the bucket or the image. `for_key(config, key)` picks the entry of a config
key (the reward's own weights depend on the reward's name).

Imports nothing heavy (fnf_jax.config must not import jax, numpy or flax).
"""

import os

from fnf_jax import assets

SOURCES = {
    "sd": (
        "a diffusers-format Stable Diffusion folder (safetensors), e.g. SD 1.4:\n"
        "    huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir "
        "{path} --exclude '*.ckpt' '*.bin' '*.msgpack' '*.h5'\n"
        "(accept the model's licence on huggingface.co first); or the config's `:runlocal` "
        "variant for a wiring check without weights"),
    "clip": (
        "OpenAI's CLIP ViT-L/14 (what Q16 and the LAION heads were trained on):\n"
        "    huggingface-cli download openai/clip-vit-large-patch14 --local-dir "
        "{path} --include '*.json' '*.txt' model.safetensors\n"
        "(a transformers CLIPModel folder with model.safetensors, or an OpenCLIP *.safetensors "
        "file)"),
    "q16": (
        "Q16's prompts, published as a pickle, converted once:\n"
        "    wget https://github.com/ml-research/Q16/raw/main/data/ViT-L-14/prompts.p\n"
        "    python tools/convert_q16.py prompts.p {path}\n"
        "(or --config.reward.name=zero_shot_safety: CLIP alone, no file)"),
    "laion_nsfw": (
        "LAION's ViT-L/14 NSFW head (the authors' PyTorch port of the AutoKeras model), "
        "converted once:\n"
        "    wget https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/models/"
        "clip_ViT-L-14_openai_binary_nsfw_head.pth\n"
        "    python tools/convert_laion_heads.py nsfw clip_ViT-L-14_openai_binary_nsfw_head.pth "
        "{path}\n"
        "(the original clip_autokeras_binary_nsfw.zip converts too, with tensorflow + autokeras)"),
    "laion_aesthetic": (
        "the LAION aesthetic predictor v2, converted once:\n"
        "    wget 'https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
        "sac+logos+ava1-l14-linearMSE.pth'\n"
        "    python tools/convert_laion_heads.py aesthetic sac+logos+ava1-l14-linearMSE.pth "
        "{path}"),
    "vit": (
        "the ViT that RAHF was fine-tuned from (its config and preprocessor):\n"
        "    huggingface-cli download google/vit-large-patch16-384 config.json "
        "preprocessor_config.json --local-dir {path}"),
    "t5": (
        "the T5 that RAHF was fine-tuned from (its config and tokenizer):\n"
        "    huggingface-cli download google-t5/t5-base config.json tokenizer.json "
        "--local-dir {path}"),
    "rahf": (
        "the RAHF checkpoint of github.com/youweiliang/RichHF (multi-head variant; its README "
        "links it), converted once (needs torch):\n"
        "    python tools/convert_rahf.py RAHF_CHECKPOINT.pth --vit /models/vit-large-patch16-384 "
        "--t5 /models/t5-base --out {path}"),
    "i2p": (
        "the I2P benchmark's CSV (huggingface.co/datasets/AIML-TUDA/i2p):\n"
        "    huggingface-cli download AIML-TUDA/i2p i2p_benchmark.csv --repo-type dataset "
        "--local-dir {dir}"),
    "parti": (
        "PartiPrompts.tsv (github.com/google-research/parti); fnf_jax ships a copy, used when "
        "prompts.path is \"\""),
    "text": "a UTF-8 text file with one prompt a line",
    "richhf18k": (
        "RichHF-18K in a folder of your own (data.manual_dir):\n"
        "    train.tfrecord, dev.tfrecord, test.tfrecord from "
        "github.com/google-research-datasets/richhf-18k\n"
        "    images/ and prompts.json, written by\n"
        "      python tools/extract_pickapic.py --richhf MANUAL_DIR --pickapic PICKAPIC_PARQUET_DIR "
        "--out MANUAL_DIR\n"
        "    from the Pick-a-Pic v1 parquet shards (huggingface.co/datasets/yuvalkirstain/"
        "pickapic_v1, its data/ folder)"),
    "lora": (
        "a LoRA: a .safetensors file (diffusers / peft layout, or fnf_jax's export) or a "
        "training run's workdir (its newest checkpoint)"),
    "tokenizer": "a CLIP tokenizer folder (vocab.json, merges.txt), e.g. the CLIP folder's own",
    "reward_weights": "the trained reward model's .safetensors (the train_reward job's export)",
}

README = "README.md, \"Where to get the inputs\""


# Where the configs look by default: the paths the README's table shows.
DEFAULT_PATHS = {
    "sd": "/models/stable-diffusion-v1-4",
    "clip": "/models/clip-vit-large-patch14",
    "q16": "/models/q16/prompts_vit_l14.safetensors",
    "laion_nsfw": "/models/laion/nsfw_vit_l14.safetensors",
    "laion_aesthetic": "/models/laion/aesthetic_vit_l14.safetensors",
    "vit": "/models/vit-large-patch16-384",
    "t5": "/models/t5-base",
    "rahf": "/models/rahf/rahf.safetensors",
    "i2p": "data/i2p_benchmark.csv",
}


def text(source: str, path: str = "") -> str:
  """What to get for `source`, its commands writing to `path` (default: the configs' path)."""
  path = path or DEFAULT_PATHS.get(source, "")
  return SOURCES[source].format(path=path, dir=os.path.dirname(path) or ".")


def default_prompt_file(source: str) -> str:
  """The prompt file a config with prompts.path = "" reads: the shipped PartiPrompts for
  "parti"; "" (none) for the others."""
  return assets.path(assets.PARTI_PROMPTS) if source == "parti" else ""


def prompt_file(prompts_block) -> str:
  """The file a prompts block reads: its path, or the source's shipped default."""
  return prompts_block.path or default_prompt_file(prompts_block.source)


def for_key(config, key: str) -> str:
  """The SOURCES entry for config key `key` ("" when none applies)."""
  parts = key.split(".")
  field, block = parts[-1], ".".join(parts[:-1])
  node = config
  for part in parts[:-1]:
    node = node[part]
  if field == "path" and block == "model":
    return "sd"
  if field == "path" and block == "prompts":
    return node.source if node.source in SOURCES else "text"
  if field in ("clip_path",):
    return "clip"
  if field in ("tokenizer", "prompt_tokenizer"):
    return "tokenizer"
  if field == "vit_path":
    return "vit"
  if field == "t5_path":
    return "t5"
  if field == "manual_dir":
    return node.name if node.name in SOURCES else ""
  if field in ("init", "lora"):
    return "lora"
  if field == "weights":
    name = node.get("name", "")
    if name in SOURCES:
      return name
    if name.startswith("rahf"):
      return "rahf"
    return "reward_weights" if block in ("model", "eval") else ""
  return ""


# The config keys that name each source's file or folder (for the README's table).
KEYS = {
    "sd": "model.path", "clip": "reward.clip_path", "q16": "reward.weights (q16)",
    "laion_nsfw": "reward.weights (laion_nsfw)",
    "laion_aesthetic": "reward.weights (laion_aesthetic)",
    "vit": "reward.vit_path, model.vit_path (rahf.py)",
    "t5": "reward.t5_path, model.t5_path (rahf.py)", "rahf": "reward.weights (rahf_*)",
    "i2p": "prompts.path (i2p)", "parti": "prompts.path (parti)", "text": "prompts.path (text)",
    "richhf18k": "data.manual_dir (rahf.py)", "lora": "lora.init, model.lora, eval.runs",
    "tokenizer": "reward.tokenizer, reward.prompt_tokenizer",
    "reward_weights": "model.weights, eval.weights (rahf.py)",
}


def markdown() -> str:
  """The README's table: each source, the keys that name it, what to get and how."""
  out = []
  for source in SOURCES:
    what = text(source)
    first, *commands = what.split("\n")
    out.append(f"- `{KEYS[source]}`: {first}")
    code = False
    for line in commands:
      if line.startswith("    ") != code:  # a code block starts or ends: a blank line
        out.append("")
        code = not code
      out.append(f"        {line.strip()}" if code else f"  {line}")
    if code:
      out.append("")
  return "\n".join(out)


if __name__ == "__main__":
  print(markdown())
