"""Layer constructors shared by every model.

Each parameter carries logical axis names (a PartitionSpec of names such as "embed_in"), never mesh axes,
so the models build and run with no mesh; cassr_jax.parallel maps the names onto a mesh for data/FSDP
sharding. Eager sharding is off per variable for the same reason.

A Policy holds the two dtypes of the dtype policy: parameters (param_dtype) and computation (dtype),
so fp32 parameters with bf16 compute, or bf16 parameters, are one argument.
"""
from __future__ import annotations

import dataclasses

import jax
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


# CPU convolutions as one matmul when XLA's own CPU convolution is the slower choice (measured at SD-1.5
# shapes, scripts/bench/unet_forward.py --breakdown): 1x1 kernels always; larger kernels when the output has
# at most this many pixels (batch included), where the weights dominate (SD's 16x16 and 8x8 levels:
# 0.3-0.8x XLA's time); the im2col patch matrix is then small. Other backends keep XLA's convolution.
MATMUL_CONV_MAX_ROWS = 512
_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, out_sharding=None,
                         preferred_element_type=None):
  """jax.lax.conv_general_dilated, or on CPU the same NHWC/HWIO convolution as an im2col matmul."""
  kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
  simple = (jax.default_backend() == "cpu" and lhs.ndim == 4 and dimension_numbers == _NHWC
            and feature_group_count == 1 and out_sharding is None and not isinstance(padding, str)
            and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())))
  if simple:
    (pt, pb), (pl, pr) = padding
    sh, sw = window_strides
    b, h, w, c = lhs.shape
    out_h, out_w = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    simple = (kh == kw == 1 and sh == sw == 1 and not any(padding[0] + padding[1])) or (
        b * out_h * out_w <= MATMUL_CONV_MAX_ROWS)
  if not simple:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision,
        out_sharding=out_sharding, preferred_element_type=preferred_element_type)
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if pt or pb or pl or pr else lhs
  # Patches in kernel order (row i, column j, then channel) to match rhs reshaped to (kh*kw*C, O).
  patches = [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]
  cols = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
  y = jnp.dot(cols.reshape(b * out_h * out_w, kh * kw * c), rhs.reshape(kh * kw * c, rhs.shape[-1]),
              precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(b, out_h, out_w, rhs.shape[-1])


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
      conv_general_dilated=conv_general_dilated,
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
