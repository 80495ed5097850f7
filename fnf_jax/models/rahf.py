"""RAHF, the Rich Automatic Human Feedback model (Liang et al., CVPR 2024), multi-head variant, in
linen: per-pixel heatmaps (implausibility, misalignment) and scores (plausibility, alignment,
aesthetics, overall) of an image and its prompt.

    image [B, S, S, 3] (normalised) --ViT--> [B, 1 + n², Dv] --projection--> [B, 1 + n², d]
    prompt ids [B, L] --T5 embedding--> [B, L, d]
    T5 encoder over [image tokens ; prompt tokens] (prompt padding masked)
    -> its outputs at the n² patch tokens as an n×n grid [B, n, n, d]
    -> heatmap heads (convs, 4 transposed convs ×2, a sigmoid): [B, 16n, 16n] in [0, 1]
    -> score heads (6 convs, a 3-layer MLP, a sigmoid): [B] in [0, 1]

This follows the paper and the layout of the public PyTorch reimplementation by its first author
(github youweiliang/RichHF: ViT-L/16 at 384², t5-base, multi-head), so that its checkpoint
converts (fnf_jax/models/rahf_convert.py, run by tools/convert_rahf.py). Its "LayerNorm" over channels is
T5's: x / sqrt(mean_c(x²) + 1e-8) · scale, no mean, no bias (`ChannelNorm`). Its T5 decoder,
which writes out misaligned words, is not part of this model: the rewards need the encoder only.

Parameters: {"vit": ViT, "t5": T5 encoder, "visual_token_projection", "heatmap_<name>",
"score_<name>"}, only the heads the model is built with (a reward builds the one score and the
one heatmap it reads). Our file layout (`save` / `load`) is that tree flattened with "/" in
safetensors, with the head sizes and head names in its metadata (RAHFHeads).
"""

import dataclasses
import json
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fnf_jax.models import convert
from fnf_jax.models import t5 as t5_lib
from fnf_jax.models import vit as vit_lib
from fnf_jax.models.layers import CONV_IN, CONV_OUT, EMBED, MLP, NORM, conv, dense

SCORE_TYPES = ("plausibility", "alignment", "aesthetics", "overall")
HEATMAP_TYPES = ("implausibility", "misalignment")
FORMAT = "fnf_jax.rahf/1"
CONVERT_HELP = ("Convert the RAHF checkpoint once (needs torch):\n"
                "    python tools/convert_rahf.py RAHF_CHECKPOINT.pth --vit VIT_FOLDER "
                "--t5 T5_FOLDER --out RAHF.safetensors\n"
                "(README, 'RAHF rewards', says where the checkpoint and the two folders come "
                "from).")


@dataclasses.dataclass(frozen=True)
class RAHFHeads:
  """Widths of the heads (the reimplementation's, for a T5 of width d, by default) and which
  heads there are."""

  scores: tuple[str, ...] = SCORE_TYPES
  heatmaps: tuple[str, ...] = HEATMAP_TYPES
  heat_convs: tuple[int, ...] = (768, 384)  # 3×3 convs on the n×n grid
  heat_ups: tuple[int, ...] = (768, 384, 384, 192)  # one ×2 transposed conv + residual pair each
  heat_last: int = 192  # the 3×3 conv before the 1-channel output
  score_convs: tuple[int, ...] = ()  # () = d, d/2, d/4, d/8, d/16, d/64
  score_mlp: tuple[int, ...] = (512, 128)

  def score_channels(self, d: int) -> tuple[int, ...]:
    return self.score_convs or (d, d // 2, d // 4, d // 8, d // 16, d // 64)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "RAHFHeads":
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})


class ChannelNorm(nn.Module):
  """RMS over the channels, then a learned scale (RAHF's T5-style norm of feature maps)."""

  epsilon: float = 1e-8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(x.dtype)


class UpConv(nn.Module):
  """PyTorch's ConvTranspose2d(kernel 3, stride 2, padding 1, output_padding 1): doubles H, W.

  Written as what it equals: a 3×3 convolution over the input dilated by 2, padded (1, 2). Its
  `kernel` [3, 3, in, out] is that convolution's, i.e. PyTorch's weight [in, out, 3, 3] flipped
  in both spatial axes (convert_state_dict does the flip)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, CONV_IN, CONV_OUT)),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (CONV_OUT,)),
                      (self.features,), jnp.float32)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1),
                                     ((1, 2), (1, 2)), lhs_dilation=(2, 2),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32)
    return (y + bias).astype(self.dtype)


class HeatmapHead(nn.Module):
  """[B, n, n, d] -> [B, 16n, 16n] in [0, 1] (four ×2 upsamplings)."""

  heads: RAHFHeads
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, relu = self.heads, nn.relu
    for i, c in enumerate(h.heat_convs):
      x = ChannelNorm(name=f"norm_{i}")(relu(conv(c, dtype=self.dtype, name=f"conv_{i}")(x)))
    for i, c in enumerate(h.heat_ups):
      x = relu(ChannelNorm(name=f"up_{i}_norm")(UpConv(c, self.dtype, name=f"up_{i}")(x)))
      y = relu(ChannelNorm(name=f"up_{i}_norm_a")(conv(c, dtype=self.dtype,
                                                       name=f"up_{i}_conv_a")(x)))
      y = ChannelNorm(name=f"up_{i}_norm_b")(conv(c, dtype=self.dtype, name=f"up_{i}_conv_b")(y))
      x = relu(x + y)
    x = relu(conv(h.heat_last, dtype=self.dtype, name="out_0")(x))
    x = conv(1, dtype=self.dtype, name="out_1")(x)
    return jax.nn.sigmoid(x[..., 0].astype(jnp.float32))


class ScoreHead(nn.Module):
  """[B, n, n, d] -> [B] in [0, 1]."""

  heads: RAHFHeads
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, c in enumerate(self.heads.score_channels(x.shape[-1])):
      x = nn.relu(ChannelNorm(name=f"norm_{i}")(conv(c, dtype=self.dtype, name=f"conv_{i}")(x)))
    # Flattened in NHWC order (the converter permutes PyTorch's NCHW-ordered first layer).
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.heads.score_mlp):
      x = nn.relu(dense(width, (MLP, MLP), dtype=self.dtype, name=f"dense_{i}")(x))
    x = dense(1, (MLP, None), dtype=self.dtype, name=f"dense_{len(self.heads.score_mlp)}")(x)
    return jax.nn.sigmoid(x[:, 0].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class RAHFConfig:
  vit: Any  # vit.ViTConfig
  t5: Any  # t5.T5Config
  heads: RAHFHeads = RAHFHeads()

  @property
  def grid(self) -> tuple[int, int]:
    """Patch rows and columns: the T5 outputs' grid that the heads read."""
    return self.vit.grid


class RAHF(nn.Module):
  """`__call__(pixels [B, S, S, 3] normalised as the ViT expects, ids [B, L], mask [B, L])` ->
  ({heatmap name: [B, 16n, 16n]}, {score name: [B]}) of the heads named in `heatmaps` and
  `scores` (default: all the model has)."""

  config: RAHFConfig
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    c = self.config
    self.vit = vit_lib.ViTModel(c.vit, dtype=self.dtype, remat=self.remat,
                                add_pooling_layer=False)
    self.t5 = t5_lib.T5Encoder(c.t5, dtype=self.dtype, remat=self.remat)
    self.visual_token_projection = dense(c.t5.d_model, (EMBED, MLP), dtype=self.dtype)
    self.heatmap = {k: HeatmapHead(c.heads, self.dtype) for k in c.heads.heatmaps}
    self.score = {k: ScoreHead(c.heads, self.dtype) for k in c.heads.scores}

  def __call__(self, pixels: jax.Array, ids: jax.Array, mask: jax.Array,
               heatmaps: Sequence[str] | None = None, scores: Sequence[str] | None = None):
    heatmaps = self.config.heads.heatmaps if heatmaps is None else heatmaps
    scores = self.config.heads.scores if scores is None else scores
    grid = self.features(pixels, ids, mask)
    return ({k: self.heatmap[k](grid) for k in heatmaps}, {k: self.score[k](grid) for k in scores})

  def features(self, pixels: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The T5 encoder's outputs at the patch tokens, as a grid [B, n, n, d]."""
    image = self.visual_token_projection(self.vit(pixels).last_hidden_state)  # [B, 1 + n², d]
    tokens = jnp.concatenate([image, self.t5.embed(ids).astype(image.dtype)], axis=1)
    attend = jnp.concatenate([jnp.ones(image.shape[:2], bool), mask.astype(bool)], axis=1)
    fused = self.t5(inputs_embeds=tokens, attention_mask=attend)
    gh, gw = self.config.grid
    return fused[:, 1:1 + gh * gw].reshape(fused.shape[0], gh, gw, fused.shape[-1])


def _example(config: RAHFConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  pixels = jnp.zeros((1, *config.vit.image_size, config.vit.num_channels))
  return pixels, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)


def abstract_params(config: RAHFConfig) -> Any:
  return convert.abstract_params(RAHF(config), *_example(config))


def init_params(config: RAHFConfig, seed: int) -> dict:
  """Random params (float32 numpy): the tiny CPU variant's weights and a trainer's start."""
  params = jax.jit(lambda key: RAHF(config).init(key, *_example(config))["params"])(
      jax.random.key(seed))
  return jax.tree.map(np.asarray, nn.meta.unbox(params))


# ----------------------------------------------------------------------- our file layout


def save(path: str, params: dict, heads: RAHFHeads, metadata: dict | None = None) -> None:
  flat = {"/".join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params).items()}
  convert.write_safetensors(path, flat, {"format": FORMAT, "heads": heads.to_json(),
                                         **(metadata or {})})


def read_heads(path: str) -> RAHFHeads:
  """The head layout recorded in a converted file (before anything large is read)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  if not path.endswith(".safetensors"):
    raise convert.CheckpointError(f"{path}: RAHF weights are read from a .safetensors file in "
                                  f"fnf_jax's layout.\n{CONVERT_HELP}")
  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
  except FileNotFoundError:
    raise convert.CheckpointError(f"RAHF weights not found: {path}.\n{CONVERT_HELP}") from None
  except Exception as e:  # pylint: disable=broad-except  # safetensors' errors omit the path
    raise convert.CheckpointError(f"{path}: not a readable safetensors file ({e}).\n"
                                  f"{CONVERT_HELP}") from e
  if meta.get("format") != FORMAT or "heads" not in meta:
    raise convert.CheckpointError(
        f"{path}: not RAHF weights in fnf_jax's layout (metadata format "
        f"{meta.get('format')!r}, expected {FORMAT!r}).\n{CONVERT_HELP}")
  return RAHFHeads.from_json(meta["heads"])


def select_heads(have: RAHFHeads, names: RAHFHeads, where: str) -> RAHFHeads:
  """The heads named in `names` with the widths of `have` (a file's), which must hold them."""
  for kind in ("scores", "heatmaps"):
    for k in getattr(names, kind):
      if k not in getattr(have, kind):
        raise convert.CheckpointError(
            f"{where} has no {kind[:-1]} head {k!r} (it has {list(getattr(have, kind))}): "
            f"convert a multi-head RAHF checkpoint that has it.\n{CONVERT_HELP}")
  return dataclasses.replace(have, scores=names.scores, heatmaps=names.heatmaps)


def load(path: str, config: RAHFConfig, *, where_vit: str = "", where_t5: str = "") -> dict:
  """Params of `config` (its heads a subset of the file's) from a file written by `save`;
  every shape is checked against `config`, and a mismatch says which folder disagrees."""
  select_heads(read_heads(path), config.heads, path)
  tensors = convert.read_state_dict([path])
  target = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)))
  out = {}
  # The towers first: a folder of another geometry is named by its own weights' shapes.
  for key in sorted(target, key=lambda k: (k[0] not in ("vit", "t5"), k)):
    leaf, name = target[key], "/".join(key)
    if name not in tensors:
      raise convert.CheckpointError(f"{path} lacks {name!r} (shape {tuple(leaf.shape)}).\n"
                                    f"{CONVERT_HELP}")
    value = tensors[name]
    if tuple(value.shape) != tuple(leaf.shape):
      part = key[0]
      folder = {"vit": f"the ViT at {where_vit!r}", "t5": f"the T5 at {where_t5!r}"}.get(
          part, f"the ViT at {where_vit!r} and the T5 at {where_t5!r}")
      raise convert.CheckpointError(
          f"{path}: {name!r} has shape {tuple(value.shape)}, but {folder} makes it "
          f"{tuple(leaf.shape)} (ViT patch {config.vit.patch_size}, width "
          f"{config.vit.hidden_size}, image {config.vit.image_size}; T5 width "
          f"{config.t5.d_model}): the weights were converted for other models. Pass the "
          "folders they were converted with, or convert again.")
    out[key] = np.asarray(value, np.float32)
  return traverse_util.unflatten_dict(out)
