"""LPIPS (Zhang et al. 2018), v0.1, in JAX: the `lpips` package's formula with torchvision's AlexNet or VGG16.

  d(x, y) = sum_l mean_hw( sum_c w_lc (f̂_l(x) - f̂_l(y))_c^2 ),  f̂ = f / (||f||_channels + 1e-10)
with f_l the backbone's ReLU outputs on the scaled input (2 x - 1 - shift) / scale, and w_l the learned
linear layers (the lpips wheel's weights/v0.1/{alex,vgg}.pth).

DECISION: `lpips` (the default metric) is AlexNet, as in pyiqa's 'lpips' (net='alex', version 0.1), which
the paper (IQA-PyTorch) and SeeSR's evaluation use; `lpips_vgg` is pyiqa's 'lpips-vgg'.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_jax.eval import weights
from cassr_jax.eval.alexnet import load_alexnet
from cassr_jax.eval.vgg import load_vgg16

NETS = ("alex", "vgg")
# The lpips ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def unit_normalize(f: jax.Array) -> jax.Array:
  """f / (channel-wise L2 norm + 1e-10) (lpips' normalize_tensor)."""
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + EPS)


class LPIPSModel(nnx.Module):
  """Backbone plus the five linear layers; __call__(pred, gt) in [0, 1] NHWC -> (B,) distances."""

  def __init__(self, backbone: nnx.Module, linear: list[np.ndarray]):
    self.backbone = backbone
    self.linear = nnx.List([nnx.Param(jnp.asarray(w, jnp.float32)) for w in linear])

  def __call__(self, pred: jax.Array, gt: jax.Array) -> jax.Array:
    batch = pred.shape[0]
    x = jnp.concatenate([pred, gt], axis=0) * 2.0 - 1.0
    x = (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)
    total = jnp.zeros((batch,), x.dtype)
    for feature, w in zip(self.backbone(x), self.linear):
      diff = jnp.square(unit_normalize(feature[:batch]) - unit_normalize(feature[batch:]))
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", diff, w[...]), axis=(1, 2))
    return total


def load_lpips(net: str = "alex", weights_dir: str | None = None) -> LPIPSModel:
  """LPIPSModel with the real weights (see cassr_jax.eval.weights)."""
  if net not in NETS:
    raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
  backbone = load_alexnet(weights_dir) if net == "alex" else load_vgg16("max", weights_dir)
  key = f"lpips_{net}"
  arrays, source = weights.load(key, weights_dir), weights.locate(key, weights_dir)
  channels = [c.out_features for c in backbone.convs]
  if net == "vgg":
    channels = [channels[i] for i in (1, 3, 6, 9, 12)]  # the last conv of each stage
  linear = [weights.require(arrays, f"lin{i}.model.1.weight", (1, c, 1, 1), source).reshape(c)
            for i, c in enumerate(channels)]
  return LPIPSModel(backbone, linear)


class LPIPS(weights.NetworkMetric):
  """The LPIPS metric (lower is better) on (B, H, W, 3) images in [0, 1]."""
  min_size = 32

  def __init__(self, net: str = "alex", weights_dir: str | None = None):
    if net not in NETS:
      raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
    super().__init__(weights_dir)
    self.net = net
    self.name = "lpips" if net == "alex" else f"lpips-{net}"

  def build(self) -> LPIPSModel:
    return load_lpips(self.net, self.weights_dir)


lpips = LPIPS("alex")
lpips_vgg = LPIPS("vgg")
METRICS = (lpips, lpips_vgg)
