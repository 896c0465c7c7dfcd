"""Colour correction of a super-resolved image from a reference (the LR image upsampled), after VAE decoding.

Diffusion SR drifts in colour; the usual fix keeps the output's detail and takes the colour from the input:
  "wavelet": wavelet reconstruction (StableSR / PASD / DiffBIR): the image is split into a low-frequency part
             (a stack of dilated 3x3 binomial blurs, dilation 1, 2, 4, ...) and the high-frequency rest; the
             result is the output's high frequencies + the reference's low frequencies.
  "adain":   per-image, per-channel mean and standard deviation of the output set to the reference's
             (SeeSR's default).
  "none":    the output unchanged.
All are jittable and work on float (B, H, W, C) images; output and reference must have the same shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

COLOR_FIXES = ("wavelet", "adain", "none")
WAVELET_LEVELS = 5
_BINOMIAL = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0


def _blur(x: jax.Array, dilation: int) -> jax.Array:
  """3x3 binomial blur with taps `dilation` apart, border replicated (per channel)."""
  p = dilation
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
  h, w = x.shape[1], x.shape[2]
  out = jnp.zeros_like(x)
  for i in range(3):
    for j in range(3):
      out = out + _BINOMIAL[i, j] * padded[:, i * p:i * p + h, j * p:j * p + w]
  return out


def wavelet_decompose(x: jax.Array, levels: int = WAVELET_LEVELS) -> tuple[jax.Array, jax.Array]:
  """(high, low) with high + low == x: low is x blurred at dilations 1, 2, ..., 2**(levels-1)."""
  low = x
  high = jnp.zeros_like(x)
  for level in range(levels):
    blurred = _blur(low, 2 ** level)
    high = high + (low - blurred)
    low = blurred
  return high, low


def wavelet_color_fix(image: jax.Array, reference: jax.Array, levels: int = WAVELET_LEVELS) -> jax.Array:
  high, _ = wavelet_decompose(image, levels)
  _, low = wavelet_decompose(reference, levels)
  return high + low


def adain_color_fix(image: jax.Array, reference: jax.Array, eps: float = 1e-5) -> jax.Array:
  axes = (1, 2)
  mean, std = jnp.mean(image, axes, keepdims=True), jnp.std(image, axes, keepdims=True)
  ref_mean, ref_std = jnp.mean(reference, axes, keepdims=True), jnp.std(reference, axes, keepdims=True)
  return (image - mean) / (std + eps) * ref_std + ref_mean


def color_fix(image: jax.Array, reference: jax.Array, method: str = "wavelet") -> jax.Array:
  """Applies the named correction ("wavelet", "adain" or "none"); computed in float32."""
  if method not in COLOR_FIXES:
    raise ValueError(f"color fix must be one of {COLOR_FIXES}, got {method!r}")
  if image.ndim != 4 or image.shape != reference.shape:
    raise ValueError(f"color fix: image {tuple(image.shape)} and reference {tuple(reference.shape)} must be "
                     "equal (B, H, W, C) shapes")
  if method == "none":
    return image
  x, ref = image.astype(jnp.float32), reference.astype(jnp.float32)
  out = wavelet_color_fix(x, ref) if method == "wavelet" else adain_color_fix(x, ref)
  return out.astype(image.dtype)
