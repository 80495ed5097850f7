"""A diffusers-format Stable Diffusion folder loaded into Flax modules and frozen params.

    pipe = fnf_jax.diffusion.pipeline.load("/models/stable-diffusion-v1-5")
    images = pipe.generate(["a photo of a cat"], seed=0)   # [B, H, W, 3] float32 in [0, 1]
    tuned = pipe.generate(["a photo of a cat"], seed=0, lora="WORKDIR")  # a run's LoRA applied

`Pipeline` holds the modules (static) and their params (a pytree), and exposes the pure pieces
(`conditioning`, `denoiser`, `decode`) that the training step composes under its own jit; only
`generate` is a convenience that jits them for inference.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from fnf_jax.diffusion import sampling
from fnf_jax.diffusion import schedulers
from fnf_jax.models import clip
from fnf_jax.models import clip_tokenizer
from fnf_jax.models import convert
from fnf_jax.models import lora as lora_lib
from fnf_jax.models import lora_io
from fnf_jax.models import unet as unet_lib
from fnf_jax.models import vae as vae_lib

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Pipeline:
  """Modules, tokenizers and scheduler settings of one checkpoint, plus its frozen params.

  params = {"unet": ..., "vae": ..., "text_encoder": ..., ["text_encoder_2": ...]}.
  """

  unet: nn.Module
  vae: nn.Module
  text_encoders: tuple[nn.Module, ...]
  tokenizers: tuple[Any, ...]
  scheduler: schedulers.DDIMConfig
  params: dict
  path: str = ""
  force_zeros_for_empty_prompt: bool = False

  @property
  def is_sdxl(self) -> bool:
    return len(self.text_encoders) == 2

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, C) of the UNet's native latent size (sample_size)."""
    size = self.unet.config.sample_size
    return (size, size, self.unet.config.in_channels)

  @property
  def image_size(self) -> int:
    return self.unet.config.sample_size * self.vae_scale_factor

  @functools.cached_property
  def inference(self) -> "Pipeline":
    """This pipeline with modules that recompute nothing (`remat` off), the same parameters: for
    what no gradient goes through (sampling, the reference, evaluation), where nn.remat would
    cost tracing time and nothing else."""
    if not (self.unet.remat or self.vae.remat):
      return self
    return dataclasses.replace(self, unet=self.unet.clone(remat=False),
                               vae=self.vae.clone(remat=False))

  def abstract_params(self) -> dict:
    """The params' shapes with their logical axis names (from eval_shape of each init)."""
    out = {"unet": convert.abstract_params(self.unet, *unet_lib.dummy_inputs(self.unet.config)),
           "vae": convert.abstract_params(self.vae, vae_lib.dummy_images(self.vae.config))}
    names = ("text_encoder", "text_encoder_2")
    for name, encoder, tok in zip(names, self.text_encoders, self.tokenizers):
      out[name] = convert.abstract_params(encoder, jnp.zeros((1, tok.model_max_length), jnp.int32))
    return out

  # --- tokens -------------------------------------------------------------------------------
  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """[num_encoders, B, L] int32 token ids (L: model_max_length, 77 in SD), one per tokenizer."""
    return np.stack([tok(list(prompts)) for tok in self.tokenizers])

  # --- pure pieces (params are arguments; jit them from outside) ----------------------------
  def encode_prompts(self, params: dict, ids: jax.Array) -> dict:
    """Token ids [E, B, 77] -> UNet conditioning {"context": [B, 77, D], "text_embeds": ...}.

    SD 1.x / 2.x take the last hidden state of the single encoder; SDXL concatenates the
    penultimate hidden states of both encoders and adds the second encoder's pooled projection.
    """
    if not self.is_sdxl:
      out = self.text_encoders[0].apply({"params": params["text_encoder"]}, ids[0])
      return {"context": out.last_hidden_state}
    names = ("text_encoder", "text_encoder_2")
    outs = [enc.apply({"params": params[n]}, ids[i])
            for i, (enc, n) in enumerate(zip(self.text_encoders, names))]
    context = jnp.concatenate([o.hidden_states[-2] for o in outs], axis=-1)
    return {"context": context, "text_embeds": outs[1].text_embeds}

  def conditioning(self, params: dict, ids: jax.Array, neg_ids: jax.Array, *, guided: bool,
                   zero_uncond: bool = False) -> tuple[dict, dict | None]:
    """(cond, uncond) for `denoiser`; uncond is None without guidance (it would not be used).

    `zero_uncond` replaces the negative embeddings by zeros (SDXL's force_zeros_for_empty_prompt).
    """
    cond = self.encode_prompts(params, ids)
    if not guided:
      return cond, None
    uncond = self.encode_prompts(params, neg_ids)
    if zero_uncond:
      uncond = jax.tree.map(jnp.zeros_like, uncond)
    return cond, uncond

  def sdxl_time_ids(self, batch: int, height: int, width: int) -> jax.Array:
    # original_size + crop top-left + target_size, as diffusers' _get_add_time_ids.
    ids = jnp.asarray([height, width, 0, 0, height, width], jnp.float32)
    return jnp.broadcast_to(ids, (batch, 6))

  def zeroes_uncond(self, negative_prompts: Sequence[str]) -> bool:
    """Whether the unconditional branch is zeros rather than the negative prompts' embeddings:
    SDXL checkpoints with force_zeros_for_empty_prompt do so for empty negative prompts, as
    diffusers does when no negative prompt is given."""
    return bool(self.is_sdxl and self.force_zeros_for_empty_prompt
                and all(not n for n in negative_prompts))

  def unet_model(self, unet_params: dict, lora: dict | None = None):
    """model(x, t, cond) for `sampling.guided`: cond is the dict from `encode_prompts`; `lora`
    is a "lora" variable collection (`fnf_jax.models.lora.collection`) applied beside the
    frozen kernels, or None."""
    variables = {"params": unet_params} if lora is None else {"params": unet_params, "lora": lora}

    def model(x, t, cond):
      added = None
      if self.is_sdxl:  # SDXL conditions on the image size, which the latents' size gives
        height, width = (x.shape[1] * self.vae_scale_factor, x.shape[2] * self.vae_scale_factor)
        added = {"text_embeds": cond["text_embeds"],
                 "time_ids": self.sdxl_time_ids(x.shape[0], height, width)}
      t = jnp.broadcast_to(t, (x.shape[0],))
      return self.unet.apply(variables, x, t, cond["context"], added_cond=added)

    return model

  def denoiser(self, unet_params: dict, cond: dict, uncond: dict | None, guidance_scale,
               lora: dict | None = None) -> sampling.Denoiser:
    """The guided UNet output for (x, t), as `sampling.sample` takes it."""
    return sampling.guided(self.unet_model(unet_params, lora), cond, uncond, guidance_scale)

  def decode(self, vae_params: dict, latents: jax.Array) -> jax.Array:
    """Latents [B, h, w, C] -> images [B, H, W, 3] in [0, 1] (float32)."""
    z = vae_lib.from_latents(latents, self.vae.config)
    images = self.vae.apply({"params": vae_params}, z, method=self.vae.decode)
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  # --- inference ----------------------------------------------------------------------------
  def generate(self, prompts: Sequence[str], *, latents=None, seed: int = 0,
               num_inference_steps: int = 50, guidance_scale: float = 7.5,
               negative_prompt: str | Sequence[str] | None = "", eta: float = 0.0,
               lora=None, lora_scale: float | None = None) -> np.ndarray:
    """Images [B, H, W, 3] float32 in [0, 1] for `prompts`.

    Args:
      prompts: the prompts.
      latents: initial noise x_T, NHWC [B, h, w, C]; drawn from `seed` when None.
      seed: seeds x_T (when `latents` is None) and the sampler noise (when eta > 0).
      num_inference_steps: DDIM steps.
      guidance_scale: classifier-free guidance; <= 1 turns guidance off (one UNet pass a step).
      negative_prompt: the unconditional prompt(s). For SDXL checkpoints with
        force_zeros_for_empty_prompt, an empty negative prompt means zero embeddings, as in
        diffusers when no negative prompt is given.
      eta: DDIM eta; > 0 draws sampler noise from `seed`.
      lora: a LoRA applied to the UNet: a path (a file or a run's workdir: anything
        `fnf_jax.models.lora_io.load` reads, read at every call) or a LoRA tree
        (`fnf_jax.models.lora`; `lora_io.load` returns one). It runs beside the frozen kernels
        as in training, so these are the images the training's panels show; its weights are an
        argument of the compiled sampler, so another LoRA of the same layers and ranks (or
        another scale) reuses the compilation.
      lora_scale: s of W + s·A·B (alpha / rank). Required with a tree; with a path, None takes
        the file's and a number replaces it.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = len(prompts)
    if isinstance(negative_prompt, str) or negative_prompt is None:
      negative = [negative_prompt or ""] * batch
    else:
      negative = list(negative_prompt)
      if len(negative) != batch:
        raise ValueError(f"{len(negative)} negative prompts for {batch} prompts")
    key_latents, key_noise = jax.random.split(jax.random.key(seed))
    h, w, c = self.latent_shape
    if latents is None:
      latents = jax.random.normal(key_latents, (batch, h, w, c), jnp.float32)
    latents = jnp.asarray(latents, jnp.float32)
    if latents.shape[0] != batch or latents.ndim != 4:
      raise ValueError(f"latents must be [B={batch}, h, w, C] NHWC, got {latents.shape}")
    noise = None
    if eta > 0:
      noise = jax.random.normal(key_noise, (num_inference_steps,) + latents.shape, jnp.float32)
    do_cfg = guidance_scale > 1.0
    zero_uncond = self.zeroes_uncond(negative)
    lora, lora_scale = self._lora(lora, lora_scale)
    images = _generate_jit(self, self.params, jnp.asarray(self.tokenize(prompts)),
                           jnp.asarray(self.tokenize(negative)), latents, noise,
                           jnp.float32(guidance_scale), num_inference_steps, do_cfg,
                           zero_uncond, float(eta), lora, lora_scale)
    return np.asarray(images, np.float32)

  def _lora(self, lora, lora_scale) -> tuple[dict | None, jax.Array | None]:
    """(tree, scale) of generate's `lora` argument, checked against the UNet; (None, None)."""
    if lora is None:
      if lora_scale is not None:
        raise ValueError("generate(lora_scale=...) without a lora")
      return None, None
    if isinstance(lora, (str, os.PathLike)):
      tree, scale = lora_io.load(lora, self.params["unet"])
      scale = scale if lora_scale is None else lora_scale
    elif lora_scale is None:
      raise ValueError("generate(lora=<a LoRA tree>) needs lora_scale (alpha / rank); "
                       "lora_io.load returns both")
    else:
      tree, scale = lora, lora_scale
    tree, scale = lora_io.load_tree(tree, self.params["unet"], scale=scale,
                                    where="generate(lora=...)")
    return tree, jnp.float32(scale)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10))
def _generate_jit(pipe: Pipeline, params, ids, neg_ids, latents, noise, guidance_scale,
                  num_steps: int, do_cfg: bool, zero_uncond: bool, eta: float, lora, lora_scale):
  cond, uncond = pipe.conditioning(params, ids, neg_ids, guided=do_cfg, zero_uncond=zero_uncond)
  added = None if lora is None else lora_lib.collection(lora, lora_scale)
  denoise = pipe.denoiser(params["unet"], cond, uncond, guidance_scale, lora=added)
  x0, _ = sampling.sample(denoise, latents, pipe.scheduler, num_steps=num_steps, eta=eta, noise=noise)
  return pipe.decode(params["vae"], x0)


def _require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise convert.CheckpointError(
        f"missing {what}: {path!r}. A Stable Diffusion checkpoint in diffusers format holds "
        "model_index.json and the folders unet/, vae/, text_encoder/, tokenizer/, scheduler/ "
        "(SDXL also text_encoder_2/, tokenizer_2/). Download one (e.g. with `huggingface-cli "
        "download <repo> --local-dir DIR`) on a machine with network access and pass DIR.")
  return path


def load(path: str, *, dtype: str = "float32", attention_impl: str = "auto",
         unet_remat: bool = False, vae_remat: bool = False) -> Pipeline:
  """Loads a diffusers-format Stable Diffusion 1.x / 2.x / SDXL folder (safetensors only).

  `dtype` ("float32" | "bfloat16") is the compute dtype of every module; with bfloat16 the
  UNet's and the VAE's parameters are also stored in it (half the memory), while the text
  encoders' stay float32 (they run once per prompt). `unet_remat` / `vae_remat` recompute each
  block of the UNet / the VAE in a backward pass (the gradient steps; the reward's gradient
  through the decoder at full resolution), for memory.
  """
  with open(_require(os.path.join(path, "model_index.json"), "model_index.json")) as f:
    index = json.load(f)
  cls = index.get("_class_name", "")
  if cls not in SUPPORTED_PIPELINES:
    raise convert.CheckpointError(
        f"{os.path.join(path, 'model_index.json')}: pipeline class {cls!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_PIPELINES)}")
  sdxl = cls == "StableDiffusionXLPipeline"
  sub = lambda name: _require(os.path.join(path, name), f"component folder {name}/")
  unet, unet_params = unet_lib.load(sub("unet"), dtype=dtype, attention_impl=attention_impl,
                                    remat=unet_remat)
  vae, vae_params = vae_lib.load(sub("vae"), dtype=dtype, attention_impl=attention_impl,
                                 remat=vae_remat)
  names = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
  encoders, params = [], {"unet": unet_params, "vae": vae_params}
  for name in names:
    module, p = clip.load_text_encoder(sub(name), dtype=dtype, attention_impl=attention_impl)
    encoders.append(module)
    params[name] = p
  tokenizers = tuple(clip_tokenizer.load(sub(n)) for n in (
      ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",)))
  scheduler = schedulers.DDIMConfig.from_folder(sub("scheduler"))
  logging.info("loaded %s from %s (%s)", cls, path, dtype)
  return Pipeline(unet=unet, vae=vae, text_encoders=tuple(encoders), tokenizers=tokenizers,
                  scheduler=scheduler, params=params, path=path,
                  force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt",
                                                              sdxl)))
