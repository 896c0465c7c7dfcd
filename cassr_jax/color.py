"""Colour correction of a super-resolved image from a reference (the LR image upsampled), after VAE decoding.

Diffusion SR drifts in colour; the usual fix keeps the output's detail and takes the colour from the input:
  "wavelet": wavelet reconstruction (StableSR / PASD / DiffBIR): the image is split into a low-frequency part
             (a stack of dilated 3x3 binomial blurs, dilation 1, 2, 4, ...) and the high-frequency rest; the
             result is the output's high frequencies + the reference's low frequencies.
  "adain":   per-image, per-channel mean and standard deviation of the output set to the reference's
             (SeeSR's default).
  "none":    the output unchanged.
All are jittable and work on float (B, H, W, C) images; output and reference must have the same shape.
color_fix_tiles computes the same tile by tile (wavelet: each tile on a window with the blurs' reach of
extra pixels; AdaIN: the reference's statistics summed tile by tile), from a reference that may be given as a
crop function, so a lazy full-size reference never exists whole and temporaries follow the tile.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cassr_jax.tiling import crop, tile_starts

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


FIX_TILE = 128  # tile side of color_fix_tiles (its temporaries: ~30 float32 windows of (tile + 62)^2 x C)


def _crop_fn(reference):
  """reference_crop(y, x, h, w) for an array (or a crop function as is)."""
  if callable(reference):
    return reference
  return lambda y, x, h, w: crop(reference, y, x, h, w)


def _tile_table(h: int, w: int, tile: tuple[int, int], reach: int = 0) -> dict[str, jax.Array]:
  """Tiles covering (h, w): starts, the starts of windows reaching `reach` pixels past them (clamped into
  the image), and how many leading rows/columns an earlier tile already covered (the last tile of an axis
  ends at the image end, so it may overlap its neighbour)."""
  cols = {}
  for name, size, t in (("y", h, tile[0]), ("x", w, tile[1])):
    starts = np.asarray(tile_starts(size, t, 0), np.int64)
    window = min(size, t + 2 * reach)
    cols[name] = (starts, np.clip(starts - reach, 0, size - window),
                  np.concatenate([[0], starts[:-1] + t]) - starts)
  grid = [(i, j) for i in range(len(cols["y"][0])) for j in range(len(cols["x"][0]))]
  table = {}
  for key, k in (("", 0), ("window_", 1), ("skip_", 2)):
    table[key + "y"] = jnp.asarray([cols["y"][k][i] for i, _ in grid], jnp.int32)
    table[key + "x"] = jnp.asarray([cols["x"][k][j] for _, j in grid], jnp.int32)
  return table


def _stats_by_tiles(reference_crop: Callable, shape, tile: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Per-image, per-channel mean and standard deviation of the (B, H, W, C) image reference_crop describes,
  in two passes over tiles as jnp.mean / jnp.std do (the mean first, then the mean squared deviation)."""
  b, h, w, c = shape
  table = _tile_table(h, w, tile)

  def total(fn):
    def body(acc, row):
      part = reference_crop(row["y"], row["x"], tile[0], tile[1]).astype(jnp.float32)
      keep = ((jnp.arange(tile[0]) >= row["skip_y"])[:, None] & (jnp.arange(tile[1]) >= row["skip_x"])[None, :])
      return acc + jnp.sum(jnp.where(keep[None, :, :, None], fn(part), 0.0), axis=(1, 2), keepdims=True), None
    return jax.lax.scan(body, jnp.zeros((b, 1, 1, c), jnp.float32), table)[0]

  mean = total(lambda part: part) / (h * w)
  return mean, jnp.sqrt(total(lambda part: jnp.square(part - mean)) / (h * w))


def color_fix_tiles(image: jax.Array, reference: jax.Array | Callable[..., jax.Array], method: str = "wavelet", *,
                    tile: int = FIX_TILE, finish: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """color_fix(image, reference, method), computed tile by tile (equal up to float summation order).

  reference: an array like image, or reference_crop(y, x, h, w) -> its pixels [y, y+h) x [x, x+w) as
  (B, h, w, C) (starts may be traced), e.g. a lazy image's crop: it is only ever read a tile at a time.
  finish: applied to the float32 result before it is stored (e.g. a clip, or a conversion to uint8; default:
  back to image's dtype). Wavelet: every tile is computed on a window reaching the blurs' reach past it (or to
  the image border, where the blurs replicate the border as on the whole image), so it equals the whole
  image's. AdaIN: the reference's statistics are summed tile by tile.
  """
  if method not in COLOR_FIXES:
    raise ValueError(f"color fix must be one of {COLOR_FIXES}, got {method!r}")
  if image.ndim != 4:
    raise ValueError(f"color fix: image must be (B, H, W, C), got shape {tuple(image.shape)}")
  finish = finish or (lambda x: x.astype(image.dtype))
  reference_crop = _crop_fn(reference)
  b, h, w, c = image.shape
  th, tw = min(tile, h), min(tile, w)
  ref_shape = jax.eval_shape(lambda: reference_crop(0, 0, th, tw)).shape
  if ref_shape != (b, th, tw, c):
    raise ValueError(f"color fix: reference tiles {tuple(ref_shape)} do not match the image {tuple(image.shape)}")
  if method == "none":
    return finish(image)
  if method == "adain":
    x = image.astype(jnp.float32)
    if (th, tw) == (h, w):
      ref = reference_crop(0, 0, h, w).astype(jnp.float32)
      ref_mean, ref_std = jnp.mean(ref, (1, 2), keepdims=True), jnp.std(ref, (1, 2), keepdims=True)
    else:
      ref_mean, ref_std = _stats_by_tiles(reference_crop, image.shape, (th, tw))
    mean, std = jnp.mean(x, (1, 2), keepdims=True), jnp.std(x, (1, 2), keepdims=True)
    return finish((x - mean) / (std + 1e-5) * ref_std + ref_mean)
  reach = 2 ** WAVELET_LEVELS - 1  # the blurs' total dilation: pixels further away do not matter
  wh, ww = min(h, th + 2 * reach), min(w, tw + 2 * reach)
  if (wh, ww) == (h, w):
    return finish(wavelet_color_fix(image.astype(jnp.float32), reference_crop(0, 0, h, w).astype(jnp.float32)))
  table = _tile_table(h, w, (th, tw), reach)
  out_dtype = jax.eval_shape(finish, jax.ShapeDtypeStruct((b, th, tw, c), jnp.float32)).dtype
  zero = jnp.zeros((), jnp.int32)

  def body(out, row):
    y0, x0 = row["window_y"], row["window_x"]
    img = crop(image, y0, x0, wh, ww).astype(jnp.float32)
    fixed = wavelet_color_fix(img, reference_crop(y0, x0, wh, ww).astype(jnp.float32))
    fixed = crop(fixed, row["y"] - y0, row["x"] - x0, th, tw)
    return jax.lax.dynamic_update_slice(out, finish(fixed).astype(out_dtype), (zero, row["y"], row["x"], zero)), None

  return jax.lax.scan(body, jnp.zeros((b, h, w, c), out_dtype), table)[0]
