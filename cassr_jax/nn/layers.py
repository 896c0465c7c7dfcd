"""Layer constructors shared by every model.

Each parameter carries logical axis names (a PartitionSpec of names such as "embed_in"), never mesh axes,
so the models build and run with no mesh; cassr_jax.parallel maps the names onto a mesh for data/FSDP
sharding. Eager sharding is off per variable for the same reason.

A Policy holds the two dtypes of the dtype policy: parameters (param_dtype) and computation (dtype),
so fp32 parameters with bf16 compute, or bf16 parameters, are one argument.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

# Logical axis vocabulary (see cassr_jax.parallel for the mesh rules).
CONV_KERNEL = (None, None, "embed_in", "embed_out")
LINEAR_KERNEL = ("embed_in", "embed_out")
CHANNELS = ("embed_out",)
VOCAB_TABLE = ("vocab", "embed_out")


@dataclasses.dataclass(frozen=True)
class Policy:
  """dtype policy: parameter storage dtype and computation dtype."""
  param_dtype: jnp.dtype = jnp.float32
  dtype: jnp.dtype = jnp.float32

  @classmethod
  def parse(cls, param_dtype: str = "float32", dtype: str = "float32") -> "Policy":
    return cls(jnp.dtype(param_dtype), jnp.dtype(dtype))


FP32 = Policy()


def _annotated(init, names):
  return nnx.with_partitioning(init, names, eager_sharding=False)


def conv(in_ch: int, out_ch: int, kernel: int = 3, *, stride: int = 1, padding: int | None = None,
         bias: bool = True, zero_init: bool = False, policy: Policy = FP32, rngs: nnx.Rngs) -> nnx.Conv:
  """2-D convolution over NHWC with torch's symmetric padding (default kernel // 2)."""
  pad = kernel // 2 if padding is None else padding
  kernel_init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
  return nnx.Conv(
      in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      use_bias=bias, dtype=policy.dtype, param_dtype=policy.param_dtype,
      kernel_init=_annotated(kernel_init, CONV_KERNEL),
      bias_init=_annotated(nnx.initializers.zeros_init(), CHANNELS), rngs=rngs)


def linear(in_features: int, out_features: int, *, bias: bool = True, zero_init: bool = False,
           policy: Policy = FP32, rngs: nnx.Rngs) -> nnx.Linear:
  kernel_init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
  return nnx.Linear(
      in_features, out_features, use_bias=bias, dtype=policy.dtype, param_dtype=policy.param_dtype,
      kernel_init=_annotated(kernel_init, LINEAR_KERNEL),
      bias_init=_annotated(nnx.initializers.zeros_init(), CHANNELS), rngs=rngs)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5, *, policy: Policy = FP32,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm over NHWC or NTC; statistics in fp32 (two-pass variance, as torch)."""
  return nnx.GroupNorm(
      channels, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=policy.dtype,
      param_dtype=policy.param_dtype,
      scale_init=_annotated(nnx.initializers.ones_init(), CHANNELS),
      bias_init=_annotated(nnx.initializers.zeros_init(), CHANNELS), rngs=rngs)


def layer_norm(features: int, eps: float = 1e-5, *, policy: Policy = FP32, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features, epsilon=eps, use_fast_variance=False, dtype=policy.dtype, param_dtype=policy.param_dtype,
      scale_init=_annotated(nnx.initializers.ones_init(), CHANNELS),
      bias_init=_annotated(nnx.initializers.zeros_init(), CHANNELS), rngs=rngs)


def embed(num: int, features: int, *, policy: Policy = FP32, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(
      num, features, dtype=policy.dtype, param_dtype=policy.param_dtype,
      embedding_init=_annotated(nnx.initializers.normal(0.02), VOCAB_TABLE), rngs=rngs)
