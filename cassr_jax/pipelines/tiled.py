"""Tiled latent denoising and tiled VAE encode/decode, so peak memory follows the tile size, not the image.

Everything runs through cassr_jax.tiling.tiled_apply (one tile shape, so one compile; tiles go `tile_batch`
at a time through lax.map; the tile grid comes from static shapes, so it all sits inside jit):
  - latents: every denoiser call splits x_t into overlapping latent tiles, crops the image-space conditions
    (LR and reference, `image_scale` x the latent size) to match, runs the tiles `tile_batch` at a time and
    blends the outputs with a Gaussian bump per tile (MultiDiffusion); the sampler sees an ordinary
    denoiser. With CFG inside `apply` (the pipeline does this), only a tile batch is ever doubled.
  - VAE: the decoder maps latent tiles to image tiles and the encoder image tiles to latent tiles, blended
    with tiling's linear ramps. GroupNorm statistics become per tile, the usual price of tiled VAEs.
A tile as large as the input is no tiling at all: the plain call, bit for bit.
UpsampledLR is the bicubic-upsampled (clipped, padded) LR as a lazy image: each tile computes its own pixels
from the LR, so the pipeline never holds a full-size float copy of it.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cassr_jax.image_ops import bicubic_taps
from cassr_jax.tiling import TileSource, materialize, tiled_apply


def _axis_table(in_size: int, out_size: int, padded: int, pad_mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Bicubic taps (padded, taps) and weights of one axis, with the padding's rows/columns mapped to the
  upsampled ones they copy (np.pad's index map, so any pad width and mode match jnp.pad's)."""
  if in_size == out_size:  # resize_bicubic leaves this axis alone: one tap of weight 1
    idx, weights = np.arange(in_size, dtype=np.int32)[:, None], np.ones((in_size, 1))
  else:
    idx, weights = bicubic_taps(in_size, out_size, False)
  source = np.pad(np.arange(out_size), (0, padded - out_size), mode=pad_mode)
  return idx[source], weights[source]


class UpsampledLR(TileSource):
  """pad(clip(resize_bicubic(lr, size), 0, 1)) * scale + offset as a lazy (B, H', W', C) image.

  lr: (B, h, w, C) float; size: the resized (out_h, out_w); padded: the (H', W') after padding the bottom and
  right with `pad_mode` (np.pad modes "reflect" / "edge"). A crop gathers only the LR rows and columns its
  taps read: the same products summed in the same order as the full resize, so crops equal its slices.
  """

  def __init__(self, lr: jax.Array, size: tuple[int, int], padded: tuple[int, int] | None = None,
               pad_mode: str = "reflect", scale: float = 1.0, offset: float = 0.0):
    if lr.ndim != 4:
      raise ValueError(f"UpsampledLR expects (B, h, w, C) images, got shape {lr.shape}")
    padded = tuple(size) if padded is None else tuple(padded)
    if padded[0] < size[0] or padded[1] < size[1]:
      raise ValueError(f"UpsampledLR: padded size {padded} is smaller than the resized {tuple(size)}")
    self.lr = lr if jnp.issubdtype(lr.dtype, jnp.floating) else lr.astype(jnp.float32)
    self.size, self.padded, self.pad_mode = tuple(size), padded, pad_mode
    self.scale, self.offset = scale, offset
    self.shape = (lr.shape[0], padded[0], padded[1], lr.shape[3])
    self.dtype = self.lr.dtype
    self._rows = _axis_table(lr.shape[1], size[0], padded[0], pad_mode)
    self._cols = _axis_table(lr.shape[2], size[1], padded[1], pad_mode)

  def affine(self, scale: float, offset: float) -> "UpsampledLR":
    """The same image times scale plus offset (e.g. 2, -1: [0, 1] -> [-1, 1])."""
    return UpsampledLR(self.lr, self.size, self.padded, self.pad_mode, self.scale * scale,
                       self.offset * scale + offset)

  def _resize(self, x: jax.Array, axis: int, table, start, length: int) -> jax.Array:
    idx, weights = table
    if isinstance(start, int):
      idx, weights = jnp.asarray(idx[start:start + length]), jnp.asarray(weights[start:start + length], x.dtype)
    else:
      idx = jax.lax.dynamic_slice_in_dim(jnp.asarray(idx), start, length)
      weights = jax.lax.dynamic_slice_in_dim(jnp.asarray(weights, x.dtype), start, length)
    taps = idx.shape[1]
    gathered = jnp.take(x, idx.reshape(-1), axis=axis)
    gathered = gathered.reshape(x.shape[:axis] + (length, taps) + x.shape[axis + 1:])
    return jnp.sum(gathered * weights.reshape((length, taps) + (1,) * (x.ndim - axis - 1)), axis=axis + 1)

  def crop(self, y, x, h: int, w: int) -> jax.Array:
    out = self._resize(self.lr, 1, self._rows, y, h)  # rows first, then columns, as resize_bicubic
    out = jnp.clip(self._resize(out, 2, self._cols, x, w), 0.0, 1.0)
    if self.scale != 1.0 or self.offset != 0.0:
      out = out * self.scale + self.offset
    return out


def _repeat_batch(tree, times: int):
  """[a; a; ...] along the batch of every array in `tree`: the order tiled_apply stacks tiles in (tile-major,
  then batch)."""
  if times == 1:
    return tree
  return jax.tree.map(lambda a: jnp.tile(a, (times,) + (1,) * (a.ndim - 1)), tree)


def tiled_denoiser(apply: Callable[..., jax.Array], *, tile: int | None, overlap: int = 8,
                   tile_batch: int | None = None, image_scale: int = 8) -> Callable[..., jax.Array]:
  """apply(x, t, context, *images) -> out, run over overlapping latent tiles of x (Gaussian-blended).

  x: (B, h, w, C) latents; t: (B,) timesteps; context: (B, L, D), or a pytree of such arrays (e.g. the
  negative and positive prompts of CFG run inside apply); images: (B, h*image_scale, w*image_scale, c)
  conditions cropped with each tile (inside the tile loop, so no stack of every tile's crop is built); arrays
  or TileSources (lazy images, computed tile by tile).
  tile / overlap in latent pixels (None: no tiling); tile_batch: tiles per call of apply (each B examples).
  The returned function has apply's signature.
  """
  if tile is None:
    return lambda x, t, context, *images: apply(x, t, context, *(materialize(im) for im in images))

  def tiled(x, t, context, *images):
    b, h, w, _ = x.shape
    if tile >= h and tile >= w:
      return apply(x, t, context, *(materialize(im) for im in images))
    for im in images:
      if im.shape[1:3] != (h * image_scale, w * image_scale):
        raise ValueError(f"tiled_denoiser: condition of shape {tuple(im.shape)} is not {image_scale}x the "
                         f"latent size {(h, w)}")

    def on_tiles(x_tiles, *image_tiles):
      k = x_tiles.shape[0] // b
      return apply(x_tiles, _repeat_batch(t, k), _repeat_batch(context, k), *image_tiles)

    return tiled_apply(on_tiles, x, tile=tile, overlap=overlap, tile_batch=tile_batch, weights="gaussian",
                       extras=images, extras_scale=image_scale)

  return tiled


def tiled_vae_decode(vae, latents: jax.Array, *, tile: int | None = None, overlap: int = 8,
                     tile_batch: int | None = 1) -> jax.Array:
  """Scaled latents (B, h, w, C) -> images (B, h*f, w*f, 3) in [-1, 1]; tile / overlap in latent pixels."""
  if tile is None:
    return vae.decode_latents(latents)
  return tiled_apply(vae.decode_latents, latents, tile=tile, overlap=overlap, tile_batch=tile_batch)


def tiled_vae_encode(vae, images: jax.Array | TileSource, *, tile: int | None = None, overlap: int = 64,
                     tile_batch: int | None = 1) -> jax.Array:
  """Images (B, H, W, 3) in [-1, 1] -> scaled latents (posterior mean); tile / overlap in image pixels.
  images may be a TileSource (each tile's pixels computed as it is cut)."""
  if tile is None:
    return vae.encode_latents(materialize(images))
  f = vae.config.downscale
  if tile % f:
    raise ValueError(f"tiled_vae_encode: tile {tile} must be a multiple of the VAE's downscale {f}")
  return tiled_apply(vae.encode_latents, images, tile=tile, overlap=overlap, tile_batch=tile_batch, align=f)
