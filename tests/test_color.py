"""Colour correction: the defining property of each method."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cassr_jax import color


def _smooth(rng, shape=(2, 48, 40, 3)):
  yy, xx = np.meshgrid(np.linspace(0, 1, shape[1]), np.linspace(0, 1, shape[2]), indexing="ij")
  base = np.stack([0.2 + 0.5 * yy, 0.3 + 0.4 * xx, 0.5 + 0.2 * yy * xx], -1)
  return np.broadcast_to(base, shape).astype(np.float32) + 0.01 * rng.random(shape).astype(np.float32)


def test_wavelet_parts_sum_to_image_and_low_is_smooth(rng):
  x = jnp.asarray(rng.random((1, 32, 32, 3)).astype(np.float32))
  high, low = color.wavelet_decompose(x)
  np.testing.assert_allclose(np.asarray(high + low), np.asarray(x), atol=1e-6)
  assert float(jnp.std(jnp.diff(low, axis=1))) < 0.2 * float(jnp.std(jnp.diff(x, axis=1)))


def test_wavelet_takes_colour_from_reference_and_detail_from_image(rng):
  ref = jnp.asarray(_smooth(rng, (2, 80, 72, 3)))
  cast = jnp.asarray([0.2, -0.1, 0.05])
  # A constant cast is low frequency: removed exactly (blurs with replicated borders keep constants).
  np.testing.assert_allclose(np.asarray(color.color_fix(ref + cast, ref, "wavelet")), np.asarray(ref), atol=1e-5)
  # A checkerboard is pure high frequency (every binomial blur of it is 0 away from the border): kept.
  texture = 0.1 * np.where((np.indices((80, 72)).sum(0) % 2) == 0, 1.0, -1.0)[None, :, :, None]
  out = color.color_fix(ref + cast + jnp.asarray(texture, jnp.float32), ref, "wavelet")
  inner = np.s_[:, 32:-32, 32:-32]  # the blurs' reach from the border: 1 + 2 + 4 + 8 + 16 pixels
  np.testing.assert_allclose(np.asarray(out)[inner], np.asarray(ref + texture)[inner], atol=1e-5)
  np.testing.assert_allclose(np.asarray(color.color_fix(ref, ref, "wavelet")), np.asarray(ref), atol=1e-6)


def test_adain_matches_reference_statistics(rng):
  ref = jnp.asarray(rng.random((2, 16, 24, 3)).astype(np.float32))
  image = jnp.asarray(3.0 * rng.random((2, 16, 24, 3)).astype(np.float32) - 1.0)
  out = color.color_fix(image, ref, "adain")
  np.testing.assert_allclose(np.asarray(out.mean((1, 2))), np.asarray(ref.mean((1, 2))), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.std((1, 2))), np.asarray(ref.std((1, 2))), atol=1e-4)
  # Invariant to a per-channel affine change of the image (only its normalised pattern is kept).
  again = color.color_fix(2.0 * image + 0.3, ref, "adain")
  np.testing.assert_allclose(np.asarray(again), np.asarray(out), atol=1e-4)


def test_none_and_bad_arguments(rng):
  x = jnp.asarray(rng.random((1, 8, 8, 3)).astype(np.float32))
  assert color.color_fix(x, x * 0, "none") is x
  with pytest.raises(ValueError, match="color fix must be one of"):
    color.color_fix(x, x, "hist")
  with pytest.raises(ValueError, match="must be equal"):
    color.color_fix(x, x[:, :4], "adain")


@pytest.mark.parametrize("method", ["wavelet", "adain", "none"])
def test_tile_by_tile_equals_whole_image(rng, method):
  """color_fix_tiles (windows reaching the blurs' reach past each tile; AdaIN statistics summed by tiles,
  the last tile of each axis overlapping its neighbour) gives the whole-image result, from an array or a
  crop function; `finish` is applied to the result."""
  image = jnp.asarray(2.0 * rng.random((2, 96, 84, 3)), jnp.float32)
  ref = jnp.asarray(rng.random((2, 96, 84, 3)), jnp.float32)
  want = np.asarray(jax.jit(lambda i, r: color.color_fix(i, r, method))(image, ref))
  crop = lambda y, x, h, w: jax.lax.dynamic_slice(ref, (0, y, x, 0), (2, h, w, 3))
  clip = lambda v: jnp.clip(v, 0.0, 1.0)
  for reference, finish, expected in ((ref, None, want), (crop, clip, np.clip(want, 0.0, 1.0))):
    got = jax.jit(lambda i: color.color_fix_tiles(i, reference, method, tile=20, finish=finish))(image)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
