"""The RAHF rewards (fnf_jax/models/rahf.py): a real heatmap for the mask, not a saliency.

`rahf_plausibility`  score: RAHF's plausibility score (in [0, 1], higher = fewer artifacts);
                     heatmap: its implausibility heatmap (where the artifacts are).
`rahf_alignment`     score: its text-image alignment score;
                     heatmap: its misalignment heatmap (where the image disagrees with the prompt).

Both run the whole model (ViT + T5 fusion + the one head they read) on the generated image,
resized (bilinear, antialiased: what ViTImageProcessor's PIL resize does) and normalised inside
the jitted function, so reward gradients flow to the pixels. The prompt reaches the T5 encoder in
T5's own token ids: the reward tokenizes prompts on the host (`Reward.tokenize`, padded to
reward.max_prompt_tokens, the padding masked), so every batch carries them as "reward_ids".

Config fields: vit_path (a transformers ViT folder: its config.json and
preprocessor_config.json), t5_path (a transformers T5 folder with tokenizer.json), weights (the
RAHF file that tools/convert_rahf.py writes, which holds the fine-tuned ViT, T5 encoder and
heads: the folders' own weights are not read), dtype, remat, max_prompt_tokens.
weights = "tiny": a tiny RAHF with random weights (fixed seed) and a small word-level T5
tokenizer, for CPU wiring runs; the folders are not read.
"""

import os
import tempfile

import jax
import jax.numpy as jnp

from fnf_jax.config import sources
from fnf_jax.data import prompts as prompts_lib
from fnf_jax.models import convert
from fnf_jax.models import rahf as rahf_lib
from fnf_jax.models import t5 as t5_lib
from fnf_jax.models import t5_tokenizer
from fnf_jax.models import vit as vit_lib
from fnf_jax.rewards import registry

FIELDS = ("vit_path", "t5_path", "weights", "dtype", "remat", "max_prompt_tokens")
TINY = "tiny"
TINY_SEED = 0
# The words of the tiny tokenizer: the CPU variants' prompts (others map to <unk>).
TINY_WORDS = ("a", "an", "the", "of", "with", "and", "red", "blue", "green", "yellow", "circle",
              "square", "triangle", "photo", "cat", "dog", "man", "woman", "hand", "face",
              "holding", "sign", "two", "three")
DOWNLOAD = (f"Get {sources.text('vit')}\nGet {sources.text('t5')}\n"
            f"Get {sources.text('rahf')}")


def tiny_config(vocab_size: int) -> rahf_lib.RAHFConfig:
  """A RAHF small enough to train through on a CPU: 64² images, a 4×4 grid, 64² heatmaps."""
  return rahf_lib.RAHFConfig(
      vit=vit_lib.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, image_size=64, patch_size=16),
      t5=t5_lib.T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=64, num_layers=2,
                         num_heads=4, relative_attention_num_buckets=8,
                         relative_attention_max_distance=32),
      heads=rahf_lib.RAHFHeads(heat_convs=(16, 16), heat_ups=(16, 8, 8, 8), heat_last=8,
                               score_mlp=(32, 16)))


def _folder_config(folder: str, kind: str, model_type: str, make):
  if not folder or not os.path.isdir(folder):
    raise convert.CheckpointError(f"reward: the {kind} folder reward.{kind.lower()}_path="
                                  f"{folder!r} does not exist.\n{DOWNLOAD}")
  raw = convert.read_config(folder)
  if raw.get("model_type") != model_type:
    raise convert.CheckpointError(f"{os.path.join(folder, 'config.json')} has model_type "
                                  f"{raw.get('model_type')!r}; reward.{kind.lower()}_path must "
                                  f"be a transformers {kind} folder (model_type {model_type!r})")
  return make(raw)


def load(cfg, heads: rahf_lib.RAHFHeads):
  """(config, params, tokenizer, (size, mean, std)) of the RAHF that `cfg` names, with `heads`
  (names only: the widths come from the file)."""
  if cfg.weights == TINY:
    with tempfile.TemporaryDirectory(prefix="fnf_tiny_t5_tokenizer_") as folder:
      t5_tokenizer.write_tiny_tokenizer(folder, TINY_WORDS)
      tokenizer = t5_tokenizer.load(folder)  # read whole into memory
    full = tiny_config(tokenizer.vocab_size)
    config = rahf_lib.RAHFConfig(full.vit, full.t5,
                                 rahf_lib.select_heads(full.heads, heads, TINY))
    # linen derives each parameter's key from its path: these heads' values are those of the
    # tiny model with all six, and the ViT and T5 the same for both rewards.
    params = rahf_lib.init_params(config, TINY_SEED)
    return config, params, tokenizer, (config.vit.image_size, (0.5,) * 3, (0.5,) * 3)
  vit_config = _folder_config(cfg.vit_path, "ViT", "vit", vit_lib.ViTConfig.from_dict)
  t5_config = _folder_config(cfg.t5_path, "T5", "t5", t5_lib.T5Config.from_dict)
  tokenizer = t5_tokenizer.load(cfg.t5_path)
  if not cfg.weights or not os.path.isfile(cfg.weights):
    raise convert.CheckpointError(f"reward {cfg.name!r}: RAHF weights not found at "
                                  f"reward.weights={cfg.weights!r}.\n{DOWNLOAD}")
  config = rahf_lib.RAHFConfig(vit_config, t5_config, rahf_lib.select_heads(
      rahf_lib.read_heads(cfg.weights), heads, cfg.weights))
  params = rahf_lib.load(cfg.weights, config, where_vit=cfg.vit_path, where_t5=cfg.t5_path)
  if tokenizer.vocab_size > t5_config.vocab_size:
    raise convert.CheckpointError(
        f"reward {cfg.name!r}: the tokenizer in {cfg.t5_path!r} has {tokenizer.vocab_size} "
        f"tokens, more than the T5's {t5_config.vocab_size} embeddings")
  return config, params, tokenizer, vit_lib.read_preprocessor(cfg.vit_path, vit_config)


def preprocess(images: jax.Array, size: tuple[int, int], mean, std) -> jax.Array:
  """[B, H, W, 3] in [0, 1] -> the ViT's normalised [B, h, w, 3], differentiably."""
  b, h, w, c = images.shape
  x = images.astype(jnp.float32)
  if (h, w) != tuple(size):
    x = jax.image.resize(x, (b, *size, c), method="linear", antialias=True)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _build(cfg, score_name: str, heatmap_name: str) -> registry.Reward:
  config, params, tokenizer, (size, mean, std) = load(
      cfg, rahf_lib.RAHFHeads(scores=(score_name,), heatmaps=(heatmap_name,)))
  model = rahf_lib.RAHF(config, dtype=jnp.dtype(cfg.dtype), remat=bool(cfg.remat))
  length, pad = int(cfg.max_prompt_tokens), tokenizer.pad_id

  def outputs(p, images, ids, *, heat: bool):
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != length:
      raise ValueError(f"reward {cfg.name!r} reads T5 ids [B, {length}] (the batch's "
                       f"reward_ids); got shape {ids.shape}")
    pixels = preprocess(images, size, mean, std).astype(model.dtype)
    return model.apply({"params": p}, pixels, ids, ids != pad,
                       heatmaps=(heatmap_name,) if heat else (),
                       scores=() if heat else (score_name,))

  def score(p, images, ids):
    return outputs(p, images, ids, heat=False)[1][score_name]

  def heatmap(p, images, ids):
    return outputs(p, images, ids, heat=True)[0][heatmap_name]

  return registry.Reward(
      name=cfg.name, score=score, heatmap=heatmap, params=params,
      tokenize=lambda prompts: tokenizer(prompts, length)[0],
      prompt_limit=prompts_lib.TokenLimit(f"reward {cfg.name}'s T5 tokenizer",
                                          lambda p: len(tokenizer.encode(p)), length))


def build_plausibility(cfg) -> registry.Reward:
  return _build(cfg, "plausibility", "implausibility")


def build_alignment(cfg) -> registry.Reward:
  return _build(cfg, "alignment", "misalignment")


# ------------------------------------------------------------ training (train_reward's model)


def _start(cfg, heads: rahf_lib.RAHFHeads):
  """(config, starting params thunk, tokenizer, preprocessing) for training: the tiny model,
  the towers of the two folders with new heads (weights = ""), or a RAHF file to go on from."""
  if cfg.weights == TINY or (cfg.weights and os.path.isfile(cfg.weights)):
    config, params, tokenizer, prep = load(cfg, heads)
    return config, lambda: params, tokenizer, prep
  if cfg.weights:
    raise convert.CheckpointError(f"model.weights={cfg.weights!r}: no such file; \"\" starts "
                                  "from the ViT and T5 folders with new heads.\n" + DOWNLOAD)
  vit_config = _folder_config(cfg.vit_path, "ViT", "vit", vit_lib.ViTConfig.from_dict)
  t5_config = _folder_config(cfg.t5_path, "T5", "t5", t5_lib.T5Config.from_dict)
  tokenizer = t5_tokenizer.load(cfg.t5_path)
  config = rahf_lib.RAHFConfig(vit_config, t5_config, heads)

  def params():
    # New heads and projection (seeded), then the pretrained towers in place of theirs.
    out = rahf_lib.init_params(config, int(cfg.seed))
    out["vit"] = vit_lib.load(cfg.vit_path, add_pooling_layer=False)[1]
    out["t5"] = t5_lib.load(cfg.t5_path)[1]
    return out

  return config, params, tokenizer, vit_lib.read_preprocessor(cfg.vit_path, vit_config)


def trainable(cfg):
  """The RAHF family of train_reward (fnf_jax/rewards/trainable.py), all six heads."""
  from fnf_jax.rewards import trainable as trainable_lib  # pylint: disable=import-outside-toplevel
  config, params, tokenizer, (size, mean, std) = _start(cfg, rahf_lib.RAHFHeads())
  model = rahf_lib.RAHF(config, dtype=jnp.dtype(cfg.dtype), remat=bool(cfg.remat))
  length, pad = int(cfg.max_prompt_tokens), tokenizer.pad_id
  gh, gw = config.grid

  def apply(p, images, ids):
    ids = jnp.asarray(ids)
    pixels = preprocess(images, size, mean, std).astype(model.dtype)
    heat, scores = model.apply({"params": p}, pixels, ids, ids != pad)
    return ({k: v.astype(jnp.float32) for k, v in heat.items()},
            {k: v.astype(jnp.float32) for k, v in scores.items()})

  def load_file(path):
    return rahf_lib.load(path, config, where_vit=cfg.vit_path, where_t5=cfg.t5_path)

  return trainable_lib.Trainable(
      name="rahf", heatmaps=config.heads.heatmaps, scores=config.heads.scores,
      image_size=tuple(size), heatmap_size=(16 * gh, 16 * gw), init=params,
      abstract=lambda: rahf_lib.abstract_params(config),
      apply=apply, save=lambda path, p, meta: rahf_lib.save(path, p, config.heads, meta),
      load=load_file, export_name="rahf.safetensors",
      tokenize=lambda prompts: tokenizer(prompts, length)[0])
