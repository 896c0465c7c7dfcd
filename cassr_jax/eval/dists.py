"""DISTS (Ding et al. 2020) in JAX: DISTS_pytorch's formula on a VGG16 whose max pools are L2 pools.

For feature maps x_k, y_k (k = 0: the input image itself, then relu1_2 ... relu5_3 of the ImageNet-normalised
input), per channel:
  S1 = (2 mu_x mu_y + c) / (mu_x^2 + mu_y^2 + c),  S2 = (2 cov_xy + c) / (var_x + var_y + c),  c = 1e-6
  DISTS = 1 - sum_k sum_ch (alpha S1 + beta S2) / (sum alpha + sum beta)
with alpha, beta (1475 = 3+64+128+256+512+512 channels) from DISTS_pytorch's weights.pt. pyiqa's 'dists' is
the same network and formula.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax.eval import weights
from cassr_jax.eval.vgg import load_vgg16

CHANNELS = (3, 64, 128, 256, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
C1 = C2 = 1e-6


class DISTSModel(nnx.Module):
  """L2-pooled VGG16 plus alpha / beta; __call__(pred, gt) in [0, 1] NHWC -> (B,) scores."""

  def __init__(self, backbone: nnx.Module, alpha, beta):
    self.backbone = backbone
    self.alpha = nnx.Param(jnp.asarray(alpha, jnp.float32))
    self.beta = nnx.Param(jnp.asarray(beta, jnp.float32))

  def __call__(self, pred: jax.Array, gt: jax.Array) -> jax.Array:
    batch = pred.shape[0]
    x = jnp.concatenate([pred, gt], axis=0)
    h = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
    features = [x] + self.backbone(h)
    alpha, beta = self.alpha[...], self.beta[...]
    w_sum = jnp.sum(alpha) + jnp.sum(beta)
    alpha, beta = alpha / w_sum, beta / w_sum
    structure = texture = jnp.zeros((batch,), x.dtype)
    start = 0
    for feature, channels in zip(features, CHANNELS):
      a, b = alpha[start:start + channels], beta[start:start + channels]
      start += channels
      f0, f1 = feature[:batch], feature[batch:]
      mean0, mean1 = jnp.mean(f0, axis=(1, 2)), jnp.mean(f1, axis=(1, 2))
      s1 = (2 * mean0 * mean1 + C1) / (jnp.square(mean0) + jnp.square(mean1) + C1)
      var0 = jnp.mean(jnp.square(f0 - mean0[:, None, None]), axis=(1, 2))
      var1 = jnp.mean(jnp.square(f1 - mean1[:, None, None]), axis=(1, 2))
      cov = jnp.mean(f0 * f1, axis=(1, 2)) - mean0 * mean1
      s2 = (2 * cov + C2) / (var0 + var1 + C2)
      structure = structure + s1 @ a
      texture = texture + s2 @ b
    return 1.0 - (structure + texture)


def load_dists(weights_dir: str | None = None) -> DISTSModel:
  """DISTSModel with the real weights (see cassr_jax.eval.weights)."""
  arrays, source = weights.load("dists", weights_dir), weights.locate("dists", weights_dir)
  total = sum(CHANNELS)
  alpha = weights.require(arrays, "alpha", (1, total, 1, 1), source).reshape(total)
  beta = weights.require(arrays, "beta", (1, total, 1, 1), source).reshape(total)
  return DISTSModel(load_vgg16("l2", weights_dir), alpha, beta)


class DISTS(weights.NetworkMetric):
  """The DISTS metric (lower is better) on (B, H, W, 3) images in [0, 1]."""
  name = "dists"
  min_size = 16

  def build(self) -> DISTSModel:
    return load_dists(self.weights_dir)


dists = DISTS()
METRICS = (dists,)
