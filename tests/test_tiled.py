"""Tiled latent denoising and tiled VAE: exact when one tile covers the image, crops aligned, no seams."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cassr_jax.models.vae import AutoencoderKL, VAEConfig
from cassr_jax.pipelines.tiled import tiled_denoiser, tiled_vae_decode, tiled_vae_encode
from cassr_jax.tiling import tiled_apply

TINY_VAE = VAEConfig(block_out_channels=(4, 4, 8, 8), layers_per_block=1, norm_num_groups=2)


@pytest.fixture(scope="module")
def vae():
  return AutoencoderKL(TINY_VAE, attention="xla", rngs=nnx.Rngs(0))


def _pointwise(x, t, context, lr):
  """A latent-pixelwise 'denoiser': any tiling must reproduce it exactly (checks the condition crops)."""
  b, h, w, _ = x.shape
  blocks = lr.reshape(b, h, 8, w, 8, 3).mean((2, 4))
  return 2.0 * x + blocks[..., :1] + t[:, None, None, None] * 1e-3 + context.mean((1, 2))[:, None, None, None]


def _smooth_latents(b=1, h=24, w=20, c=4):
  yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
  return jnp.stack([yy, xx, yy * xx, 0.5 * (yy + xx)][:c], -1)[None].repeat(b, 0)


def test_tiled_denoiser_crops_conditions_with_latents(rng):
  x = jnp.asarray(rng.standard_normal((2, 20, 28, 4)), jnp.float32)
  lr = jnp.asarray(rng.random((2, 160, 224, 3)), jnp.float32)
  t, ctx = jnp.array([3, 700]), jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32)
  want = _pointwise(x, t, ctx, lr)
  for tile, batch in ((8, None), (12, 2), (12, 4)):  # 6 tiles: all at once, 3 batches, 2 with a padded one
    got = jax.jit(tiled_denoiser(_pointwise, tile=tile, overlap=4, tile_batch=batch))(x, t, ctx, lr)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_one_tile_is_the_plain_call(rng):
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
  lr = jnp.asarray(rng.random((1, 64, 64, 3)), jnp.float32)
  t, ctx = jnp.array([10]), jnp.zeros((1, 2, 3))
  assert (tiled_denoiser(_pointwise, tile=8)(x, t, ctx, lr) == _pointwise(x, t, ctx, lr)).all()


def _minus_tile_mean(x, t, context, lr):
  """Depends on the whole tile (like a GroupNorm): unblended tiles would meet at a step."""
  return x - x.mean((1, 2), keepdims=True)


def test_tiled_denoiser_has_no_seams_on_smooth_input():
  x = _smooth_latents(h=48, w=48)
  slope = float(jnp.abs(jnp.diff(x, axis=1)).max())
  lr, t, ctx = jnp.zeros((1, 384, 384, 3)), jnp.array([1]), jnp.zeros((1, 1, 1))
  def largest_step(overlap):
    out = np.asarray(tiled_denoiser(_minus_tile_mean, tile=16, overlap=overlap)(x, t, ctx, lr))
    return max(np.abs(np.diff(out, axis=1)).max(), np.abs(np.diff(out, axis=2)).max())
  assert largest_step(8) < 2.0 * slope          # blended: no step beyond the input's own slope, doubled
  assert largest_step(0) > 4.0 * slope          # control: tiles that only abut do show their seams


def test_tiled_vae(vae, rng):
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)  # one tile: the plain call
  decode = jax.jit(lambda z: tiled_vae_decode(vae, z, tile=16))
  np.testing.assert_array_equal(np.asarray(decode(x)), np.asarray(jax.jit(vae.decode_latents)(x)))
  img = jnp.asarray(rng.random((1, 64, 64, 3)), jnp.float32)
  encode = jax.jit(lambda im: tiled_vae_encode(vae, im, tile=64))
  np.testing.assert_array_equal(np.asarray(encode(img)), np.asarray(jax.jit(vae.encode_latents)(img)))
  z = jnp.asarray(rng.standard_normal((1, 12, 10, 4)), jnp.float32)
  dec = jax.jit(lambda z: tiled_vae_decode(vae, z, tile=8, overlap=4, tile_batch=1))(z)
  assert dec.shape == (1, 96, 80, 3) and bool(jnp.isfinite(dec).all())
  enc = jax.jit(lambda x: tiled_vae_encode(vae, x, tile=64, overlap=32))(dec)
  assert enc.shape == (1, 12, 10, 4) and bool(jnp.isfinite(enc).all())


def test_tiled_apply_downscale_needs_alignment():
  fn = lambda x: x[:, ::4, ::4]
  x = jnp.arange(32 * 32, dtype=jnp.float32).reshape(1, 32, 32, 1)
  np.testing.assert_array_equal(np.asarray(tiled_apply(fn, x, tile=16, overlap=8, align=4)),
                                np.asarray(fn(x)))
  with pytest.raises(ValueError, match="align=4"):
    tiled_apply(fn, jnp.zeros((1, 30, 30, 1)), tile=16, overlap=8)


def test_tiled_vae_memory_follows_the_tile(vae):
  """XLA's temporaries of tiled decode/encode (one tile per step) do not grow with the image: tiles are cut
  and added inside the loop (a stack of every tile, as before, made them grow 4-5x for 4x the pixels)."""
  def temporaries(fn, shape):
    return jax.jit(fn).lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().memory_analysis().temp_size_in_bytes
  decode = lambda z: tiled_vae_decode(vae, z, tile=8, overlap=4, tile_batch=1)
  encode = lambda im: tiled_vae_encode(vae, im, tile=64, overlap=32, tile_batch=1)
  for fn, small, large in ((decode, (1, 16, 16, 4), (1, 32, 32, 4)), (encode, (1, 128, 128, 3), (1, 256, 256, 3))):
    assert temporaries(fn, large) <= 1.1 * temporaries(fn, small)


def _sr_like(lr, ref, *, lazy):
  """The pipeline's data flow with cheap stand-ins for the models: LR upsampled 8x (lazy or whole), 'encoded'
  (8x8 mean) in image tiles, 'denoised' in latent tiles with the LR and reference cropped per tile, 'decoded'
  (nearest 8x) in tiles, wavelet colour fix towards the upsampled LR."""
  from cassr_jax.color import color_fix, color_fix_tiles  # pylint: disable=import-outside-toplevel
  from cassr_jax.image_ops import resize_bicubic  # pylint: disable=import-outside-toplevel
  from cassr_jax.pipelines.tiled import UpsampledLR  # pylint: disable=import-outside-toplevel
  b, h, w, _ = lr.shape
  size = (8 * h, 8 * w)
  encode = lambda im: im.reshape(b, im.shape[1] // 8, 8, im.shape[2] // 8, 8, 3).mean((2, 4)).repeat(2, -1)[..., :4]
  decode = lambda z: jnp.tanh(z[..., :3]).repeat(8, 1).repeat(8, 2)
  denoise = lambda x, t, ctx, up, rf: _pointwise(x, t, ctx, up) + _pointwise(x, t, ctx, rf)
  if lazy:
    lr_up = UpsampledLR(lr, size)
  else:
    lr_up = jnp.clip(resize_bicubic(lr, size), 0.0, 1.0)
  up2 = lr_up.affine(2.0, -1.0) if lazy else lr_up * 2.0 - 1.0
  z = tiled_apply(encode, up2, tile=64, overlap=32, tile_batch=1, align=8)
  z = tiled_denoiser(denoise, tile=8, overlap=4, tile_batch=1)(z, jnp.array([5] * b), jnp.ones((b, 2, 3)), lr_up, ref)
  images = (tiled_apply(decode, z, tile=8, overlap=4, tile_batch=1) + 1.0) * 0.5
  if lazy:
    return color_fix_tiles(images, lr_up.crop, "wavelet", finish=lambda v: jnp.clip(v, 0.0, 1.0))
  return jnp.clip(color_fix(images, lr_up, "wavelet"), 0.0, 1.0)


def test_tiled_sr_memory_follows_the_tile(rng):
  """Lazy LR upsampling (tiles computed from the LR) and the colour fix tile by tile: XLA's temporaries
  grow by about one full-size float image (the decoder's blend sum) for 4x the pixels, not by the several the
  whole upsampled LR and whole-image colour fix took; and the results are the whole-image ones."""
  def temporaries(lazy, h):
    specs = [jax.ShapeDtypeStruct((1, h, h, 3), jnp.float32), jax.ShapeDtypeStruct((1, 8 * h, 8 * h, 3), jnp.float32)]
    compiled = jax.jit(lambda lr, ref: _sr_like(lr, ref, lazy=lazy)).lower(*specs).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  image_growth = (64 * 64 - 32 * 32) * 8 * 8 * 3 * 4  # one float32 RGB image at 512^2 minus at 256^2
  growth = temporaries(True, 64) - temporaries(True, 32)
  assert growth <= 1.3 * image_growth, growth / image_growth
  assert temporaries(False, 64) - temporaries(False, 32) > 2.0 * image_growth  # control: whole images
  lr = jnp.asarray(rng.random((1, 20, 18, 3)), jnp.float32)
  ref = jnp.asarray(rng.random((1, 160, 144, 3)), jnp.float32)
  lazy, whole = (jax.jit(lambda lr, ref, lazy=lazy: _sr_like(lr, ref, lazy=lazy))(lr, ref) for lazy in (True, False))
  np.testing.assert_allclose(np.asarray(lazy), np.asarray(whole), atol=2e-6)


def test_upsampled_lr_crops_are_slices_of_the_whole(rng):
  """UpsampledLR's crops (static or traced starts, into the padding too) equal slices of the padded, clipped
  bicubic resize; affine(2, -1) maps them to [-1, 1]."""
  from cassr_jax.image_ops import resize_bicubic  # pylint: disable=import-outside-toplevel
  from cassr_jax.pipelines.tiled import UpsampledLR  # pylint: disable=import-outside-toplevel
  lr = jnp.asarray(rng.random((2, 13, 11, 3)), jnp.float32)
  for size, padded, mode in (((20, 16), (32, 32), "reflect"), ((13, 11), (16, 16), "reflect"),
                             ((1, 5), (16, 16), "edge")):
    whole = jnp.pad(jnp.clip(resize_bicubic(lr, size), 0.0, 1.0),
                    ((0, 0), (0, padded[0] - size[0]), (0, padded[1] - size[1]), (0, 0)), mode=mode)
    up = UpsampledLR(lr, size, padded, mode)
    np.testing.assert_array_equal(np.asarray(up.materialize()), np.asarray(whole))
    crop = jax.jit(lambda lr, y, x: UpsampledLR(lr, size, padded, mode).affine(2.0, -1.0).crop(y, x, 9, 8))
    np.testing.assert_allclose(np.asarray(crop(lr, 7, 5)), np.asarray(whole[:, 7:16, 5:13] * 2.0 - 1.0), atol=1e-6)
