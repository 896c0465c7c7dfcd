"""PSNR and SSIM in JAX, on BasicSR's conventions (calculate_psnr / calculate_ssim).

Inputs are float32 (B, H, W, 3) NHWC RGB in [0, 1]; both metrics work on 0-255 values as BasicSR does
(BasicSR reads uint8 images, so its values are x * 255). crop_border drops that many pixels at each edge;
test_y_channel converts to BT.601 luma (BasicSR's rgb2ycbcr, range [16, 235], not rounded) first.
SSIM: 11x11 Gaussian window sigma 1.5 (OpenCV's getGaussianKernel), "valid" positions only, constants
(0.01 * 255)^2 and (0.03 * 255)^2, per-channel means averaged over channels. This equals scikit-image's
structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
up to skimage's own border crop (it drops (win_size - 1) // 2 = 5 pixels, the same valid region).
Computed in float32 with the image mean removed before the second moments (less cancellation), which keeps
them within ~1e-6 relative of BasicSR's float64 numbers.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

# BT.601 luma weights for RGB in [0, 1] giving Y in [16, 235] (BasicSR rgb2ycbcr, y_only).
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(rgb01: jax.Array) -> jax.Array:
  """(..., 3) RGB in [0, 1] -> (...) luma Y on the 0-255 scale ([16, 235]), unrounded."""
  w = jnp.asarray(_Y_WEIGHTS, rgb01.dtype)
  return jnp.tensordot(rgb01, w, axes=([-1], [0])) + 16.0


def _check_pair(pred, gt, crop_border: int) -> None:
  if pred.shape != gt.shape:
    raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {gt.shape}")
  if pred.ndim != 4 or pred.shape[-1] != 3:
    raise ValueError(f"expected (B, H, W, 3) NHWC images, got shape {pred.shape}")
  if crop_border < 0 or 2 * crop_border >= min(pred.shape[1:3]):
    raise ValueError(f"crop_border {crop_border} leaves nothing of a {pred.shape[1]}x{pred.shape[2]} image")


def prepare_255(images: jax.Array, crop_border: int, test_y_channel: bool) -> jax.Array:
  """(B, H, W, 3) in [0, 1] -> (B, h, w, C) float32 on 0-255 after BasicSR's crop and optional Y (C = 1)."""
  x = jnp.asarray(images, jnp.float32)
  if crop_border:
    x = x[:, crop_border:-crop_border, crop_border:-crop_border, :]
  if test_y_channel:
    return rgb_to_y(x)[..., None]
  return x * 255.0


@functools.partial(jax.jit, static_argnames=("crop_border", "test_y_channel"))
def psnr(pred: jax.Array, gt: jax.Array, crop_border: int = 0, test_y_channel: bool = False) -> jax.Array:
  """Per-image PSNR in dB (B,) with peak 255; identical images give +inf as in BasicSR."""
  _check_pair(pred, gt, crop_border)
  a = prepare_255(pred, crop_border, test_y_channel)
  b = prepare_255(gt, crop_border, test_y_channel)
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  return jnp.where(mse == 0, jnp.inf, 10.0 * jnp.log10(255.0 * 255.0 / jnp.where(mse == 0, 1.0, mse)))


@functools.lru_cache(maxsize=None)
def gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised 1-D Gaussian taps, as OpenCV's getGaussianKernel(size, sigma)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  k = np.exp(-(x * x) / (2.0 * sigma * sigma))
  return k / k.sum()


def _filter_valid(maps: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable 'valid' Gaussian filtering of (N, H, W) maps: shifted slices summed along H, then W (XLA's CPU
  convolution is slower for single-channel maps)."""
  n = len(taps)
  h_out = maps.shape[1] - n + 1
  x = sum(float(taps[i]) * maps[:, i:i + h_out] for i in range(n))
  w_out = x.shape[2] - n + 1
  return sum(float(taps[i]) * x[:, :, i:i + w_out] for i in range(n))


def ssim_map_255(a: jax.Array, b: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
  """SSIM map over valid positions for (B, H, W, C) images on 0-255."""
  if min(a.shape[1:3]) < window:
    raise ValueError(f"SSIM needs images of at least {window}x{window} after cropping, got {a.shape[1:3]}")
  taps = gaussian_kernel_1d(window, sigma)
  c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
  # Second moments of mean-removed images: the variances are shift invariant and smaller numbers lose less
  # to float32 cancellation in E[x^2] - E[x]^2.
  offset = 0.5 * (jnp.mean(a, axis=(1, 2), keepdims=True) + jnp.mean(b, axis=(1, 2), keepdims=True))
  a = a - offset
  b = b - offset
  # All five filtered quantities in one batch of (B * C) single-channel maps.
  bsz, h, w, c = a.shape
  stacked = jnp.stack([a, b, a * a, b * b, a * b]).transpose(0, 1, 4, 2, 3).reshape(5 * bsz * c, h, w)
  filtered = _filter_valid(stacked, taps)
  filtered = filtered.reshape(5, bsz, c, *filtered.shape[1:]).transpose(0, 1, 3, 4, 2)
  mu_a, mu_b, aa, bb, ab = filtered
  var_a = aa - mu_a * mu_a
  var_b = bb - mu_b * mu_b
  cov = ab - mu_a * mu_b
  # The means enter shifted; restore them for the luminance term.
  ma, mb = mu_a + offset, mu_b + offset
  return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (var_a + var_b + c2))


@functools.partial(jax.jit, static_argnames=("crop_border", "test_y_channel"))
def ssim(pred: jax.Array, gt: jax.Array, crop_border: int = 0, test_y_channel: bool = False) -> jax.Array:
  """Per-image SSIM (B,), channel SSIMs averaged (BasicSR calculate_ssim)."""
  _check_pair(pred, gt, crop_border)
  a = prepare_255(pred, crop_border, test_y_channel)
  b = prepare_255(gt, crop_border, test_y_channel)
  return jnp.mean(ssim_map_255(a, b), axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class PixelMetric:
  """A full-reference pixel metric object of the metric protocol (name, kind, higher_is_better, backend)."""
  name: str
  fn: object
  crop_border: int = 0
  test_y_channel: bool = False
  kind: str = "full_reference"
  higher_is_better: bool = True
  backend: str = "jax"

  def __call__(self, pred: jax.Array, gt: jax.Array) -> jax.Array:
    if gt is None:
      raise ValueError(f"{self.name} is a full-reference metric and needs the reference images")
    return self.fn(pred, gt, crop_border=self.crop_border, test_y_channel=self.test_y_channel)

  def with_options(self, *, crop_border: int | None = None, test_y_channel: bool | None = None) -> "PixelMetric":
    return dataclasses.replace(
        self, crop_border=self.crop_border if crop_border is None else crop_border,
        test_y_channel=self.test_y_channel if test_y_channel is None else test_y_channel)


PSNR = PixelMetric("psnr", psnr)
SSIM = PixelMetric("ssim", ssim)
PSNR_Y = PixelMetric("psnr_y", psnr, test_y_channel=True)
SSIM_Y = PixelMetric("ssim_y", ssim, test_y_channel=True)
METRICS = (PSNR, SSIM, PSNR_Y, SSIM_Y)
