"""Jittable image resampling shared by the whole project (NHWC, float).

DECISION: "bicubic" in this project means PyTorch's
  F.interpolate(x, size, mode="bicubic", align_corners=False)              (antialias=False, the default)
  F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=True)  (antialias=True)
- antialias=False: Keys cubic with a = -0.75, half-pixel centres, border pixels replicated, 4 taps whatever the
  scale. Identical to OpenCV's INTER_CUBIC when upsampling. This is the "bicubic-upsampled LR" of the project
  (the form the PyTorch SR code bases, StableSR/SeeSR/PASD, feed to their ControlNets).
- antialias=True: the filter is widened by the downscale factor and renormalised, Keys a = -0.5. Identical to
  PIL's Image.BICUBIC on float images (PIL rounds uint8 images to 8 bits between its two passes). Use it to
  make clean x4 LR images for tests and benchmarks.
Both are separable: the taps and weights are computed in numpy from the static shapes at trace time, and the
resize is a gather plus a weighted sum along each axis, so it runs under jit at any size with no matmul of
size (in x out).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel with parameter a (support [-2, 2])."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def bicubic_taps(in_size: int, out_size: int, antialias: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Source indices (out, taps) int32 and weights (out, taps) float64 of a 1-D bicubic resize.

  Taps past the image edge are clamped to it (antialias=False, replicate border) or dropped and the rest
  renormalised (antialias=True); unused taps carry weight 0.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}")
  scale = in_size / out_size
  centre = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
  if not antialias:
    src = centre - 0.5  # torch does not clamp the cubic source coordinate to >= 0
    base = np.floor(src)
    t = src - base
    offsets = np.arange(-1, 3)
    idx = base[:, None].astype(np.int64) + offsets[None, :]
    weights = _cubic(t[:, None] - offsets[None, :], -0.75)
    return np.clip(idx, 0, in_size - 1).astype(np.int32), weights
  # Antialiased (PIL / torch _upsample_bicubic2d_aa): support 2 widened by the downscale factor.
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  # int() truncates toward zero as the C code does; the clamp to 0 makes the sign question moot.
  lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)
  hi = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
  taps = int(np.max(hi - lo))
  j = np.arange(taps)
  idx = lo[:, None] + j[None, :]
  valid = idx < hi[:, None]
  weights = np.where(valid, _cubic((idx - centre[:, None] + 0.5) * inv, -0.5), 0.0)
  total = weights.sum(axis=1, keepdims=True)
  weights = weights / np.where(total == 0.0, 1.0, total)
  return np.clip(idx, 0, in_size - 1).astype(np.int32), weights


def _resize_axis(x: jax.Array, axis: int, out_size: int, antialias: bool) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == out_size and not antialias:
    return x  # identity: t = 0 puts all weight on the centre tap
  idx, weights = bicubic_taps(in_size, out_size, antialias)
  gathered = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=axis)
  shape = x.shape[:axis] + (out_size, idx.shape[1]) + x.shape[axis + 1:]
  gathered = gathered.reshape(shape)
  w = jnp.asarray(weights, x.dtype).reshape((out_size, idx.shape[1]) + (1,) * (x.ndim - axis - 1))
  return jnp.sum(gathered * w, axis=axis + 1)


def resize_bicubic(x: jax.Array, size: tuple[int, int], *, antialias: bool = False) -> jax.Array:
  """Resizes (..., H, W, C) images to size = (out_h, out_w); see the module docstring for the semantics.

  Integer inputs are converted to float32; float inputs keep their dtype. No clipping (bicubic overshoots).
  """
  x = jnp.asarray(x)
  if x.ndim < 3:
    raise ValueError(f"resize_bicubic expects (..., H, W, C) images, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  out_h, out_w = (int(s) for s in size)
  x = _resize_axis(x, x.ndim - 3, out_h, antialias)
  return _resize_axis(x, x.ndim - 2, out_w, antialias)


def upscale_bicubic(x: jax.Array, scale: int) -> jax.Array:
  """(..., H, W, C) -> (..., H*scale, W*scale, C), torch bicubic without antialiasing."""
  h, w = x.shape[-3], x.shape[-2]
  return resize_bicubic(x, (h * scale, w * scale), antialias=False)


def downscale_bicubic(x: jax.Array, scale: int) -> jax.Array:
  """(..., H, W, C) -> (..., ceil(H/scale), ceil(W/scale), C) with antialiasing (PIL BICUBIC)."""
  h, w = x.shape[-3], x.shape[-2]
  return resize_bicubic(x, (math.ceil(h / scale), math.ceil(w / scale)), antialias=True)


def to_float01(image: np.ndarray) -> np.ndarray:
  """uint8 / uint16 / float image -> float32 in [0, 1]."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if image.dtype == np.uint16:
    return image.astype(np.float32) / 65535.0
  if np.issubdtype(image.dtype, np.floating):
    return image.astype(np.float32)
  raise ValueError(f"unsupported image dtype {image.dtype} (expected uint8, uint16 or float)")


def to_uint8(image) -> np.ndarray:
  """float image in [0, 1] -> uint8 (rounded, clipped)."""
  return np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
