"""Attention chosen per layer (fnf_jax/models/attention): the choice for every attention shape
of the model families on every backend, forward and under grad, and each kernel against XLA,
values and gradients, on this CPU (the Pallas kernel in its TPU interpreter, cuDNN's padding
through XLA's implementation of the same call).

Tolerances: float32 inputs; the fused kernels reorder the softmax's sums (splash's online
softmax) or add masked keys (padding), so values agree to rtol 2e-5 / atol 2e-6 and gradients to
rtol 1e-4 / atol 1e-5 (observed: about 1e-6 and 1e-5).
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnf_jax.config import choices
from fnf_jax.diffusion import random_models
from fnf_jax.models import attention as attn
from fnf_jax.models import t5 as t5_lib
from fnf_jax.models import unet as unet_lib
from fnf_jax.models import vit as vit_lib
from fnf_jax.models.attention import kernels
from fnf_jax.models.clip import configs as clip_configs
from fnf_jax.models.clip import towers

VALUES = dict(rtol=2e-5, atol=2e-6)
GRADS = dict(rtol=1e-4, atol=1e-5)

# Stable Diffusion 2.1 (768-v): 96² latents, 64-wide heads, upcast attention.
SD21_UNET = dict(random_models.SD15_UNET, sample_size=96, attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, hidden_act="gelu")


# --- the choice -------------------------------------------------------------------------------


def test_choices_lists_the_requests():
  assert set(choices.ATTENTION) == set(attn.REQUESTS)


def _layer(q_len, kv_len, heads, head_dim, dtype="bfloat16", **kw):
  return attn.Layer(batch=8, q_len=q_len, kv_len=kv_len, heads=heads, head_dim=head_dim,
                    dtype=dtype, **kw)


def test_cudnn_rules():
  cross = _layer(4096, 77, 8, 40)
  # Forward: cuDNN as it is; under grad, even lengths: 77 keys padded to 80.
  assert attn.choose(cross, attn.H100) == attn.Choice("cudnn", 4096, 77, 40)
  assert attn.choose(cross, attn.H100, differentiated=True) == attn.Choice("cudnn", 4096, 80, 40)
  # The VAE's single 512-wide head: chunked XLA (the named kernel says why).
  vae = _layer(4096, 4096, 1, 512)
  got = attn.choose(vae, attn.H100, "cudnn", differentiated=True)
  assert (got.kernel, got.remat) == ("chunked", True)
  assert "head dim 512" in got.reason
  assert attn.choose(vae, attn.H100, "cudnn").remat is False  # no remat without a backward
  # 160-wide heads: Hopper's limit is 256, Ampere's 128.
  wide = _layer(256, 256, 8, 160)
  assert attn.choose(wide, attn.H100).kernel == "cudnn"
  assert attn.choose(wide, attn.A100).kernel == "xla"
  # float32 (or an upcast layer), a bias, no CUDA: not cuDNN.
  assert attn.choose(_layer(4096, 77, 8, 40, "float32"), attn.H100).kernel == "chunked"
  assert "float32" in attn.choose(_layer(64, 64, 8, 40, "float32"), attn.H100, "cudnn").reason
  assert attn.choose(_layer(609, 609, 12, 64, bias=True), attn.H100, "cudnn").kernel == "xla"
  rocm = attn.Backend("gpu", cuda=False, capability=None)
  assert attn.choose(cross, rocm).kernel == "chunked"
  # Causal self-attention of 77 tokens under grad: both lengths padded.
  text = _layer(77, 77, 12, 64, causal=True)
  assert attn.choose(text, attn.H100, differentiated=True) == attn.Choice("cudnn", 80, 80, 64)


def test_splash_rules():
  # Head dim to the 128 lanes; lengths to blocks of 512 where both divide, else 128.
  assert attn.choose(_layer(4096, 4096, 8, 40), attn.TPU) == attn.Choice(
      "splash", 4096, 4096, 128, block=512)
  assert attn.choose(_layer(4096, 77, 8, 40), attn.TPU) == attn.Choice(
      "splash", 4096, 128, 128, block=128)
  assert attn.choose(_layer(577, 577, 16, 64), attn.TPU) == attn.Choice(
      "splash", 640, 640, 128, block=128)
  # Padding that would more than double the work stays on XLA: the 8x8 mid-block, CLIP text.
  for layer in (_layer(64, 64, 8, 160), _layer(64, 77, 8, 160), _layer(77, 77, 12, 64),
                _layer(257, 257, 16, 64)):
    got = attn.choose(layer, attn.TPU)
    assert got.kernel == "xla" and "the work" in got.reason, (layer, got)
  assert attn.choose(_layer(77, 77, 12, 64, causal=True), attn.TPU).kernel == "xla"
  # Named on a CPU: falls back, with the reason.
  got = attn.choose(_layer(4096, 4096, 8, 40), attn.CPU, "splash")
  assert got.kernel == "chunked" and "TPUs" in got.reason


def test_chunked_and_xla_rules():
  long = _layer(4096, 4096, 8, 40, "float32")
  assert attn.choose(long, attn.CPU) == attn.Choice("chunked", 4096, 4096, 40, chunk=512)
  assert attn.choose(long, attn.CPU, differentiated=True).remat
  # Lengths that 512 does not divide: equal chunks, the last rows padded.
  assert attn.choose(_layer(2304, 77, 10, 64), attn.CPU) == attn.Choice(
      "chunked", 2305, 77, 64, chunk=461)
  for layer in (_layer(77, 77, 12, 64, causal=True), _layer(512, 512, 8, 40),
                _layer(4096, 4096, 8, 40, bias=True)):
    assert attn.choose(layer, attn.CPU).kernel == "xla"
  assert attn.choose(long, attn.TPU, "xla") == attn.Choice("xla", 4096, 4096, 40)
  with pytest.raises(ValueError, match="not one of"):
    attn.choose(long, attn.CPU, "flash")


# --- every attention layer of the model families -----------------------------------------------


def _unet_layers(unet: dict, text: dict, dtype: str = "bfloat16", text_2=None):
  """The Layers of the UNet at its native latent size and of each text encoder on 77 tokens.

  Traced abstractly through `init`, which runs the forward: one trace per module, where going
  through the pipeline would trace each twice (`abstract_params`' init, then the call)."""
  pipe = random_models.random_pipeline(dtype=dtype, weights=False, unet=unet,
                                       vae=random_models.SD15_VAE, text=text, text_2=text_2)
  h, _, _ = pipe.latent_shape
  key = jax.random.key(0)
  with attn.record() as layers:
    for encoder in pipe.text_encoders:
      jax.eval_shape(functools.partial(encoder.init, key), jnp.zeros((2, 77), jnp.int32))
    jax.eval_shape(functools.partial(pipe.unet.init, key),
                   *unet_lib.dummy_inputs(pipe.unet.config, batch=2, size=h, context_length=77))
  return layers


def _vae_layers(dtype: str = "bfloat16"):
  """The SD VAE's encoder and decoder at 512² (one mid-block attention each)."""
  pipe = random_models.random_pipeline(dtype=dtype, weights=False, vae=random_models.SD15_VAE)
  with attn.record() as layers:
    jax.eval_shape(functools.partial(pipe.vae.init, jax.random.key(0)),
                   jnp.zeros((2, 512, 512, 3)))
  return layers


def _clip_vision_layers():
  module = towers.CLIPVisionTransformer(clip_configs.VIT_L_14.vision_config, dtype=jnp.bfloat16)
  with attn.record() as layers:
    jax.eval_shape(functools.partial(module.init, jax.random.key(0)),
                   jnp.zeros((2, 224, 224, 3)))
  return layers


def _vit_layers():
  module = vit_lib.ViTModel(vit_lib.PRESETS["vit-large-patch16-384"], dtype=jnp.bfloat16)
  with attn.record() as layers:
    jax.eval_shape(functools.partial(module.init, jax.random.key(0)),
                   jnp.zeros((2, 384, 384, 3)))
  return layers


def _t5_layers():
  module = t5_lib.T5Encoder(t5_lib.T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12),
                            dtype=jnp.bfloat16)
  embeds, mask = jnp.zeros((2, 609, 768)), jnp.ones((2, 609), jnp.int32)
  with attn.record() as layers:
    jax.eval_shape(lambda e, m: module.init(jax.random.key(0), inputs_embeds=e,
                                            attention_mask=m), embeds, mask)
  return layers


def _kernels(layers, backend, requested="auto", differentiated=False):
  """{kernel: number of layers} of the choices, and the set of distinct choices."""
  got = [attn.choose(layer, backend, requested, differentiated) for layer in layers]
  return collections.Counter(c.kernel for c in got), got


@pytest.fixture(scope="module")
def families():
  return {
      "sd15": _unet_layers(random_models.SD15_UNET, random_models.SD15_TEXT),
      "sd21": _unet_layers(SD21_UNET, SD21_TEXT),
      "sdxl": _unet_layers(random_models.SDXL_UNET, random_models.SDXL_TEXT,
                           text_2=random_models.SDXL_TEXT_2),
      "vae": _vae_layers(),
      "clip_vision": _clip_vision_layers(),
      "vit": _vit_layers(),
      "t5": _t5_layers(),
  }


def test_every_layer_of_every_family(families):
  f = families
  sd15_unet = [l for l in f["sd15"] if not l.causal]
  sd15_text = [l for l in f["sd15"] if l.causal]
  # 16 transformer blocks x 2 attentions; CLIP ViT-L's 12 text layers.
  assert len(sd15_unet) == 32 and len(sd15_text) == 12
  assert {(l.q_len, l.kv_len, l.head_dim) for l in sd15_unet} == {
      (4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (1024, 77, 80), (256, 256, 160),
      (256, 77, 160), (64, 64, 160), (64, 77, 160)}
  # SDXL: 70 transformer blocks x 2, text 12 + 32 layers; SD2.1: 32, text 23.
  assert len(f["sdxl"]) == 184 and len(f["sd21"]) == 55
  for grad in (False, True):
    # H100 / H200: cuDNN takes every UNet and text layer of SD1.5 and SDXL; under grad the 77
    # keys (and CLIP text's 77 queries) are padded to 80.
    for name in ("sd15", "sdxl"):
      counts, got = _kernels(f[name], attn.H100, differentiated=grad)
      assert counts == {"cudnn": len(f[name])}, (name, counts)
      on_77 = {c.kv_len for c, layer in zip(got, f[name]) if layer.kv_len == 77}
      assert on_77 == ({80} if grad else {77})
    # SD2.1 upcasts its UNet attention to float32: chunked XLA where the queries are long
    # (96² = 9216, 48² = 2304, 24² = 576 tokens), XLA on the 12² mid-block; its text is cuDNN.
    assert _kernels(f["sd21"], attn.H100, differentiated=grad)[0] == {
        "cudnn": 23, "chunked": 30, "xla": 2}
    # The VAE's single 512-wide head: chunked XLA on GPUs, even when cuDNN is named; splash
    # (head dim 512 is 4 lanes' worth) on TPUs.
    for backend in (attn.H100, attn.A100, attn.CPU):
      counts, got = _kernels(f["vae"], backend, "cudnn", differentiated=grad)
      assert counts == {"chunked": 2} and all(c.remat == grad for c in got)  # encoder, decoder
      assert all("head dim 512" in c.reason for c in got) or backend == attn.CPU
    assert _kernels(f["vae"], attn.TPU, differentiated=grad)[0] == {"splash": 2}
    # T5's relative-position bias: XLA everywhere, whatever is named.
    for backend in (attn.H100, attn.TPU, attn.CPU):
      for requested in ("auto", "cudnn", "splash"):
        assert _kernels(f["t5"], backend, requested, grad)[0] == {"xla": 12}
    # ViT-L/16-384 (577 tokens) and CLIP ViT-L/14 (257): cuDNN, padded to even lengths under
    # grad; on TPUs splash for 577 (padded to 640), XLA for 257 (384 would be 2.2x the work).
    for name, length, padded in (("vit", 577, 584), ("clip_vision", 257, 264)):
      counts, got = _kernels(f[name], attn.H100, differentiated=grad)
      assert counts == {"cudnn": 24} and {c.q_len for c in got} == {padded if grad else length}
    assert _kernels(f["vit"], attn.TPU, differentiated=grad)[0] == {"splash": 24}
    assert _kernels(f["clip_vision"], attn.TPU, differentiated=grad)[0] == {"xla": 24}
  # A100: no head wider than 128, so SD1.5's 12 layers of 160-wide heads go to XLA.
  assert _kernels(f["sd15"], attn.A100)[0] == {"cudnn": 32, "xla": 12}
  # TPU: splash wherever padding stays within 2x the work; the 8x8 mid-block and CLIP text's
  # 77 tokens stay on XLA.
  assert _kernels(sd15_unet, attn.TPU, differentiated=True)[0] == {"splash": 30, "xla": 2}
  assert _kernels(sd15_text, attn.TPU)[0] == {"xla": 12}
  assert _kernels(f["sdxl"], attn.TPU)[0] == {"splash": 140, "xla": 44}
  # CPU: chunked where the queries are long (4096, 1024 tokens), XLA elsewhere; remat only
  # under grad.
  counts, got = _kernels(sd15_unet, attn.CPU)
  assert counts == {"chunked": 20, "xla": 12} and not any(c.remat for c in got)
  assert all(c.remat for c in _kernels(sd15_unet, attn.CPU, differentiated=True)[1]
             if c.kernel == "chunked")


# --- the kernels against XLA --------------------------------------------------------------------


def _qkv(q_len, kv_len, heads=2, head_dim=40, batch=2, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
  k, v = (jax.random.normal(key, (batch, kv_len, heads, head_dim), dtype) for key in keys[1:])
  return q, k, v


def _loss(fn):
  return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))


def _value_and_grads(fn, q, k, v):
  return fn(q, k, v), jax.grad(_loss(fn), (0, 1, 2))(q, k, v)


# Value and gradients in one jitted program (run eagerly, every op would compile on its own);
# the reference is jitted once for the module, so cases of the same shapes share its compile.
@functools.partial(jax.jit, static_argnames="is_causal")
def _xla_value_and_grads(q, k, v, is_causal):
  return _value_and_grads(functools.partial(kernels.xla, scale=q.shape[-1] ** -0.5,
                                            is_causal=is_causal), q, k, v)


def _check(fn, q, k, v, *, is_causal=False):
  got, got_grads = jax.jit(functools.partial(_value_and_grads, fn))(q, k, v)
  want, want_grads = _xla_value_and_grads(q, k, v, is_causal)
  np.testing.assert_allclose(got, want, **VALUES)
  for g, ref in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, ref, **GRADS)


def test_chunked_is_xla():
  for remat in (False, True):
    # Self-attention, cross-attention, and a length the chunk does not divide (4 chunks each).
    for q_len, kv_len in ((512, 512), (512, 77), (500, 77)):
      q, k, v = _qkv(q_len, kv_len, head_dim=16)
      _check(functools.partial(kernels.chunked, scale=0.25, chunk=128, remat=remat), q, k, v)


def test_cudnn_padding_is_exact():
  """cuDNN's padded call, run through XLA's implementation (same arguments): padded keys
  masked by their length, padded query rows dropped; causal self-attention too."""
  q, k, v = _qkv(64, 77)
  _check(functools.partial(kernels.cudnn, scale=40 ** -0.5, is_causal=False, q_len=64,
                           kv_len=80, fused=False), q, k, v)
  q, k, v = _qkv(77, 77)
  _check(functools.partial(kernels.cudnn, scale=40 ** -0.5, is_causal=True, q_len=80,
                           kv_len=80, fused=False), q, k, v, is_causal=True)


@pytest.mark.parametrize("q_len,kv_len,head_dim", [(256, 256, 40), (256, 77, 40), (128, 200, 64)])
def test_splash_kernel_in_the_tpu_interpreter(q_len, kv_len, head_dim):
  layer = attn.Layer(2, q_len, kv_len, 2, head_dim, "float32")
  choice = attn.choose(layer, attn.TPU)
  assert choice.kernel == "splash"
  q, k, v = _qkv(q_len, kv_len, head_dim=head_dim)
  _check(functools.partial(kernels.splash, scale=head_dim ** -0.5, choice=choice,
                           interpret=True), q, k, v)


# --- the dispatch -------------------------------------------------------------------------------


def _primitives(fn, *args) -> set:
  """The primitive names anywhere in fn's jaxpr (sub-jaxprs included)."""
  names = set()

  def walk(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
      value = value.jaxpr
    if isinstance(value, jax.extend.core.Jaxpr):
      for eqn in value.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
          walk(param)
    elif isinstance(value, (tuple, list)):
      for item in value:
        walk(item)
  walk(jax.make_jaxpr(fn)(*args))
  return names


def test_forward_and_grad_take_their_own_choice():
  """Chunks are rematerialised only under grad; a cuDNN layer pads only under grad: the
  forward's program holds neither (JAX tells the two apart through scan and checkpoint)."""
  t = 2 * attn.choice.CHUNK
  q, k, v = _qkv(t, t, head_dim=16)
  fn = lambda q, k, v: attn.attention(q, k, v)
  assert "checkpoint" not in _primitives(fn, q, k, v)

  def kept_logits(f):
    """Whether the backward keeps any [.., rows, S] logits (rows >= a chunk) as residuals (their
    shapes: traced, not run)."""
    vjp = jax.eval_shape(lambda q, k, v: jax.vjp(f, q, k, v)[1], q, k, v)
    return any(len(r.shape) >= 2 and r.shape[-2:] in ((t, t), (t // 2, t))
               for r in jax.tree.leaves(vjp))

  assert kept_logits(lambda q, k, v: attn.attention(q, k, v, implementation="xla"))
  assert not kept_logits(fn)
  _check(fn, q, k, v)
  # Inside a scan, as the sampler calls the UNet.
  assert not kept_logits(lambda q, k, v: jax.lax.scan(lambda c, _: (fn(c, k, v), None), q,
                                                      None, length=2)[0])

  q, k, v = _qkv(64, 77, dtype=jnp.bfloat16)
  with attn.simulate(attn.H100):
    pads = lambda f: any(e.primitive.name == "pad" for e in jax.make_jaxpr(f)(q, k, v).eqns)
    assert not pads(fn)
    assert "pad" in _primitives(jax.grad(_loss(fn), (0, 1, 2)), q, k, v)
    got, grads = jax.jit(functools.partial(_value_and_grads, fn))(q, k, v)
  want, want_grads = jax.jit(functools.partial(
      _value_and_grads, lambda *a: attn.attention(*a, implementation="xla")))(q, k, v)
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2)
  for g, ref in zip(grads, want_grads):
    np.testing.assert_allclose(g.astype(np.float32), ref.astype(np.float32), atol=5e-2)


def test_simulated_tpu_runs_splash_through_the_dispatch():
  q, k, v = _qkv(256, 77)
  fn = lambda q, k, v: attn.attention(q, k, v)
  with attn.simulate(attn.TPU):
    assert "pallas_call" in _primitives(fn, q, k, v)
    _check(fn, q, k, v)


def test_splash_under_a_mesh_runs_per_device():
  """8 fake devices, the batch sharded over them: one kernel per device on its rows (shard_map),
  the same numbers."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from fnf_jax.runtime import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  q, k, v = _qkv(128, 77, batch=8)
  fn = jax.jit(lambda q, k, v: attn.attention(q, k, v))
  with attn.simulate(attn.TPU), mesh, nn.logical_axis_rules(sharding.DEFAULT_RULES):
    assert "shard_map" in _primitives(fn, q, k, v)
    got = fn(q, k, v)
  want = kernels.xla(q, k, v, scale=40 ** -0.5)
  np.testing.assert_allclose(got, want, **VALUES)


def test_a_named_kernel_that_cannot_serve_falls_back_and_says_so(caplog):
  """cuDNN named for a float32 layer: XLA serves it, and the log says why, once."""
  import logging  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(48, 48, heads=3, head_dim=24)
  with attn.simulate(attn.H100), caplog.at_level(logging.INFO):
    for _ in range(2):
      out = attn.attention(q, k, v, implementation="cudnn")
  np.testing.assert_allclose(out, kernels.xla(q, k, v, scale=24 ** -0.5), **VALUES)
  said = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
  assert len(said) == 1 and "cudnn cannot serve" in said[0] and "float32" in said[0], said
  assert "xla instead" in said[0]
