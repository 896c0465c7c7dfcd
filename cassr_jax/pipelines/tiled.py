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
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cassr_jax.tiling import tiled_apply


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
  conditions cropped with each tile (inside the tile loop, so no stack of every tile's crop is built).
  tile / overlap in latent pixels (None: no tiling); tile_batch: tiles per call of apply (each B examples).
  The returned function has apply's signature.
  """
  if tile is None:
    return apply

  def tiled(x, t, context, *images):
    b, h, w, _ = x.shape
    if tile >= h and tile >= w:
      return apply(x, t, context, *images)
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


def tiled_vae_encode(vae, images: jax.Array, *, tile: int | None = None, overlap: int = 64,
                     tile_batch: int | None = 1) -> jax.Array:
  """Images (B, H, W, 3) in [-1, 1] -> scaled latents (posterior mean); tile / overlap in image pixels."""
  if tile is None:
    return vae.encode_latents(images)
  f = vae.config.downscale
  if tile % f:
    raise ValueError(f"tiled_vae_encode: tile {tile} must be a multiple of the VAE's downscale {f}")
  return tiled_apply(vae.encode_latents, images, tile=tile, overlap=overlap, tile_batch=tile_batch, align=f)
