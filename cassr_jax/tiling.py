"""Overlapping-tile runner for image-to-image functions (NHWC), jittable and seam-free.

A function fn: (N, h, w, C) -> (N, h*s, w*s, C') is applied to equal-sized overlapping tiles of the input, and
the tile outputs are blended back with weights that are zero in an outer margin of every interior tile edge
(the pixels that saw the least context) and rise linearly across the middle of the overlap. Edges on the
image border keep full weight, since there the untiled run sees the same border. The tile grid is computed in
Python from the static shapes, so fn compiles once for one tile shape and the whole runner can sit inside
jax.jit; tiles run `tile_batch` at a time through lax.map so peak memory is bounded by that batch.
fn may also shrink its input by an integer factor (a VAE encoder: tile starts then aligned to that factor),
and `weights="gaussian"` blends with a Gaussian bump per tile instead (MultiDiffusion-style latent tiling).
The input and the extra conditions may be lazy images (TileSource: a shape, a dtype and a crop method) that
compute each tile's pixels when it is cut, so no full-size copy of them ever exists (e.g. an upsampled LR).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
  """Start offsets of tiles of length `tile` covering [0, size), neighbours overlapping by >= `overlap`.

  The starts are spread evenly, so the first tile starts at 0 and the last ends exactly at `size`; with
  align > 1 every start is a multiple of it (size and tile must then be multiples too).
  """
  if tile >= size:
    return [0]
  if not 0 <= overlap < tile:
    raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
  if size % align or tile % align:
    raise ValueError(f"tiling aligned to {align} needs size {size} and tile {tile} divisible by it")
  # Rounding the starts to `align` can shrink an overlap by up to align - 1: plan with that much more.
  stride = max(tile - overlap - (align - 1), 1)
  n = math.ceil((size - tile) / stride) + 1
  return [int(round(i * (size - tile) / (n - 1) / align)) * align for i in range(n)]


def _edge_ramp(length: int, ramp_from_start: bool, ramp_from_end: bool, overlap: int) -> np.ndarray:
  """1-D blend weight of a tile: 0 in the outer overlap/4, linear to 1 over the next overlap/2."""
  w = np.ones(length, np.float64)
  if overlap <= 0:
    return w
  d = np.arange(length, dtype=np.float64) + 0.5  # distance of each pixel centre from the start edge
  margin, ramp = overlap / 4.0, max(overlap / 2.0, 1.0)
  if ramp_from_start:
    w = np.minimum(w, np.clip((d - margin) / ramp, 0.0, 1.0))
  if ramp_from_end:
    w = np.minimum(w, np.clip((d[::-1] - margin) / ramp, 0.0, 1.0))
  return w


GAUSSIAN_SIGMA = 1.0 / 6.0  # of the tile length: edge weight exp(-4.5) ~ 1% of the centre's


def _gaussian(length: int) -> np.ndarray:
  d = np.arange(length, dtype=np.float64) + 0.5 - length / 2.0
  return np.exp(-0.5 * (d / (GAUSSIAN_SIGMA * length)) ** 2)


def _axis_weights(size: int, tile: int, starts: list[int], overlap: int, scale: Fraction,
                  kind: str = "ramp") -> list[np.ndarray]:
  length = int(tile * scale)
  if kind == "gaussian":
    return [_gaussian(length) for _ in starts]
  return [_edge_ramp(length, s > 0, s + tile < size, float(overlap * scale)) for s in starts]


class TileSource:
  """A lazy (B, H, W, C) image: crop(y, x, h, w) computes a[:, y:y+h, x:x+w] (starts static ints or traced
  int32 scalars) without the whole image existing. Subclasses set `shape` and `dtype` and define crop."""
  shape: tuple[int, int, int, int]
  dtype: jnp.dtype

  @property
  def ndim(self) -> int:
    return 4

  def crop(self, y, x, h: int, w: int) -> jax.Array:
    raise NotImplementedError

  def materialize(self) -> jax.Array:
    """The whole image (what a plain, untiled call needs)."""
    return self.crop(0, 0, self.shape[1], self.shape[2])


def materialize(a) -> jax.Array:
  """An array as is, a TileSource as its whole image."""
  return a.materialize() if isinstance(a, TileSource) else a


def crop(a, y, x0, h: int, w: int) -> jax.Array:
  """a[:, y:y+h, x0:x0+w] for static or traced starts (a: an array or a TileSource)."""
  if isinstance(a, TileSource):
    return a.crop(y, x0, h, w)
  if isinstance(y, int) and isinstance(x0, int):
    return a[:, y:y + h, x0:x0 + w]
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_slice(a, (zero, y, x0, zero), (a.shape[0], h, w, a.shape[3]))


def tiled_apply(fn: Callable[..., jax.Array], x: jax.Array | TileSource, *, tile: int | tuple[int, int],
                overlap: int = 16, tile_batch: int | None = None, align: int = 1,
                weights: str = "ramp", extras: Sequence[jax.Array | TileSource] = (),
                extras_scale: int = 1) -> jax.Array:
  """fn applied to x (B, H, W, C) tile by tile; returns what fn(x) would, blended across tile overlaps.

  tile: tile height/width in input pixels (clipped to the image; one tile means a plain fn(x)).
  overlap: minimum overlap of neighbouring tiles in input pixels; the outer quarter of it is discarded and the
    middle half cross-faded. Tiles are exact only up to fn's receptive field: larger overlaps agree better.
  tile_batch: how many tiles (each B images) go through fn at once; None runs all tiles in one call.
    Batched tiles are cut from x inside a loop and their outputs added into the result as they come, so
    memory holds x, the result and one batch of tiles (not every tile at once).
  align: tile starts are multiples of this (for fn that folds pixel blocks into channels, such as a
    pixel-unshuffle, so every tile sees the same block phase as the whole image).
  weights: "ramp" (above) or "gaussian" (a Gaussian bump on every tile, sigma = tile / 6).
  extras: further arrays (B, H*extras_scale, W*extras_scale, C') cropped with every tile and passed to fn
    after the x tile: fn(x_tile, *extra_tiles) (conditions that live at a finer resolution than x).
  x and extras may be TileSources (lazy images cropped tile by tile).
  The output scale s is found from fn's output shape on one tile: an integer, or 1/k when every tile start
  and the image size are multiples of k (pass align=k).
  """
  if weights not in ("ramp", "gaussian"):
    raise ValueError(f"tiled_apply: weights must be 'ramp' or 'gaussian', got {weights!r}")
  if x.ndim != 4:
    raise ValueError(f"tiled_apply expects (B, H, W, C), got shape {x.shape}")
  b, h, w, c = x.shape
  es = int(extras_scale)
  for e in extras:
    if e.ndim != 4 or e.shape[:3] != (b, h * es, w * es):
      raise ValueError(f"tiled_apply: extra input of shape {tuple(e.shape)} is not {es}x the input "
                       f"{(b, h, w)}")
  th, tw = (tile, tile) if isinstance(tile, int) else tile
  th, tw = min(th, h), min(tw, w)
  if th == h and tw == w:
    return fn(materialize(x), *(materialize(e) for e in extras))
  ys, xs = tile_starts(h, th, overlap, align), tile_starts(w, tw, overlap, align)
  tile_specs = [jax.ShapeDtypeStruct((b, th, tw, c), x.dtype)]
  tile_specs += [jax.ShapeDtypeStruct((b, th * es, tw * es, e.shape[3]), e.dtype) for e in extras]
  out_shape = jax.eval_shape(fn, *tile_specs)
  scale = Fraction(out_shape.shape[1], th)
  if (Fraction(out_shape.shape[2], tw) != scale or out_shape.shape[0] != b
      or (scale.numerator != 1 and scale.denominator != 1)):
    raise ValueError(f"tiled_apply: fn maps a {(b, th, tw, c)} tile to {out_shape.shape}, "
                     "not an integer up- or downscale of it")
  if any((p * scale).denominator != 1 for p in (h, w, *ys, *xs)):
    raise ValueError(f"tiled_apply: fn shrinks by {scale.denominator}; the image size {(h, w)} and the tile "
                     f"starts must be multiples of it (pass align={scale.denominator})")
  co, out_dtype = out_shape.shape[3], out_shape.dtype
  oh, ow, oth, otw = (int(v * scale) for v in (h, w, th, tw))
  wy = _axis_weights(h, th, ys, overlap, scale, weights)
  wx = _axis_weights(w, tw, xs, overlap, scale, weights)
  # The tile grid is a product of row and column tiles, so the summed weight is too (never 0: ramps keep
  # full weight at the image border and every interior pixel is some tile's middle).
  total_y, total_x = np.zeros(oh), np.zeros(ow)
  for y, wgt in zip(ys, wy):
    total_y[int(y * scale):int(y * scale) + oth] += wgt
  for x0, wgt in zip(xs, wx):
    total_x[int(x0 * scale):int(x0 * scale) + otw] += wgt
  if min(total_y.min(), total_x.min()) <= 0.0:  # cannot happen with the weights above; guards future edits
    raise AssertionError("tiled_apply: a pixel got no tile weight")
  grid = [(i, j) for i in range(len(ys)) for j in range(len(xs))]  # tile-major order, batch inside

  def cut(y, x0):
    return [crop(x, y, x0, th, tw)] + [crop(e, y * es, x0 * es, th * es, tw * es) for e in extras]

  def add(acc, out, y, x0, weight):
    oy, ox = y * scale.numerator // scale.denominator, x0 * scale.numerator // scale.denominator
    contribution = out.astype(jnp.float32) * weight[None, :, :, None]
    if isinstance(oy, int):
      return acc.at[:, oy:oy + oth, ox:ox + otw].add(contribution)
    zero = jnp.zeros((), jnp.int32)
    region = jax.lax.dynamic_slice(acc, (zero, oy, ox, zero), (b, oth, otw, co))
    return jax.lax.dynamic_update_slice(acc, region + contribution, (zero, oy, ox, zero))

  acc = jnp.zeros((b, oh, ow, co), jnp.float32)
  n = len(grid)
  if tile_batch is None or tile_batch >= n:
    pieces = [cut(ys[i], xs[j]) for i, j in grid]
    outs = fn(*[jnp.concatenate(parts, axis=0) for parts in zip(*pieces)]).reshape((n, b, oth, otw, co))
    for k, (i, j) in enumerate(grid):
      acc = add(acc, outs[k], ys[i], xs[j], jnp.asarray(np.outer(wy[i], wx[j]), jnp.float32))
  else:
    # One loop iteration per batch of tiles; a short last batch repeats its last tile with zero weight.
    k = tile_batch
    steps = -(-n // k)
    order = grid + [grid[-1]] * (steps * k - n)
    table = {"y": np.asarray([ys[i] for i, _ in order], np.int32).reshape(steps, k),
             "x": np.asarray([xs[j] for _, j in order], np.int32).reshape(steps, k),
             "wy": np.stack([wy[i] for i, _ in order]).astype(np.float32).reshape(steps, k, oth),
             "wx": np.stack([wx[j] for _, j in order]).astype(np.float32).reshape(steps, k, otw)}
    if steps * k > n:
      table["wy"][-1, k - (steps * k - n):] = 0.0

    def body(acc, row):
      pieces = [cut(row["y"][t], row["x"][t]) for t in range(k)]
      outs = fn(*[jnp.concatenate(parts, axis=0) for parts in zip(*pieces)]).reshape((k, b, oth, otw, co))
      for t in range(k):
        acc = add(acc, outs[t], row["y"][t], row["x"][t], row["wy"][t][:, None] * row["wx"][t][None, :])
      return acc, None

    acc, _ = jax.lax.scan(body, acc, jax.tree.map(jnp.asarray, table))
  inv_y = jnp.asarray(1.0 / total_y, jnp.float32)
  inv_x = jnp.asarray(1.0 / total_x, jnp.float32)
  return (acc * inv_y[None, :, None, None] * inv_x[None, None, :, None]).astype(out_dtype)
