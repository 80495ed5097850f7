"""Building blocks shared by every model family: layers with logical axis names.

Every parameter carries logical axis names (see `fnf_jax.runtime.sharding` for the rules that map them
onto a mesh), so that switching between data parallelism and FSDP is a config change. The layers
below create their parameters in float32 at init and compute in `dtype` (params of another dtype
are cast to it); normalisation statistics are always float32. Loaded params' dtype is the
loader's choice: `unet.load` float32 or bfloat16 (its `dtype`), `vae.load` float32 or its
half-precision `dtype`, the CLIP loaders always float32.

Submodules are named after the diffusers / transformers PyTorch modules they mirror, with list
indices joined by an underscore (`down_blocks.0.attentions.1` -> `down_blocks_0/attentions_1`),
which is what lets `fnf_jax.models.convert` map checkpoints without per-layer tables.

Dense layers accumulate in float32 and round to `dtype` once, after the bias and after an
optional LoRA path (`Dense`): a fine-tuned low-rank update far below half a bfloat16 step of the
frozen kernel still changes the output, as it does in float32.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# transformers' ACT2FN names -> functions, for every family that names its activation that way
# (CLIP, ViT, T5). "gelu" is the exact erf form, as torch's default; "gelu_new" and its aliases
# the tanh approximation (what T5's "gated-gelu" means).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Logical axis names used on parameters.
EMBED = "embed"  # model width (residual stream / channels of a ResNet block)
MLP = "mlp"  # hidden width of feed-forward layers and attention projections' outputs
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
VOCAB = "vocab"
NORM = "norm"

# The variable collection a LoRA enters the modules through (fnf_jax.models.lora.collection).
LORA = "lora"


class Dense(nn.Dense):
  """nn.Dense (same parameters) with y = round(x·W + b + (x·A)·B) in float32, then `dtype`.

  A and B are the "lora" collection's `lora_a` [in, r] and `lora_b` [r, out] at this module's
  path, when the apply call passes one (the LoRA's alpha / r is folded into B); they stay float32
  and x·A·B is added before the one rounding, so the update survives a bfloat16 model: merged
  into a bfloat16 kernel, any |ΔW| below half a step of W (about 0.2 % of |W|) would vanish.
  Without LoRA, and in float32, this is nn.Dense's computation.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision, preferred_element_type=jnp.float32)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,)).astype(jnp.float32)
    if self.has_variable(LORA, "lora_a"):
      a, b = self.get_variable(LORA, "lora_a"), self.get_variable(LORA, "lora_b")
      low = jnp.matmul(inputs.astype(jnp.float32), a, precision=self.precision)
      y = y + jnp.matmul(low, b, precision=self.precision)
    return y.astype(inputs.dtype)


def dense(features: int, axes: Sequence[str | None] = (EMBED, MLP), *, dtype: Dtype,
          use_bias: bool = True, name: str | None = None) -> Dense:
  """`Dense` whose kernel and bias carry logical axis names."""
  return Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(axes)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
      name=name,
  )


def conv(features: int, kernel_size: int = 3, *, stride: int = 1, padding: int | None = None,
         dtype: Dtype, name: str | None = None) -> nn.Conv:
  """nn.Conv (NHWC) with PyTorch's symmetric padding and logical axis names."""
  pad = kernel_size // 2 if padding is None else padding
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None, CONV_IN, CONV_OUT)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)),
      name=name,
  )


def _norm_params() -> dict:
  """float32 scale (ones) and bias (zeros) of a normalisation layer, with logical names."""
  return dict(param_dtype=jnp.float32,
              scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,)))


def group_norm(num_groups: int, epsilon: float, *, dtype: Dtype,
               name: str | None = None) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, name=name,
                      **_norm_params())


def layer_norm(epsilon: float, *, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name, **_norm_params())
