"""image_ops: bicubic resize parity with PyTorch, PIL and OpenCV, under jit."""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cassr_jax import image_ops

SIZES = [(148, 212), (9, 13), (20, 31), (74, 30), (37, 53), (1, 1)]


def _torch_resize(x: np.ndarray, size, antialias: bool) -> np.ndarray:
  t = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
  out = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=antialias)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_matches_torch_interpolate(rng, size, antialias):
  x = rng.random((2, 37, 53, 3)).astype(np.float32)
  ours = np.asarray(image_ops.resize_bicubic(x, size, antialias=antialias))
  ref = _torch_resize(x, size, antialias)
  assert ours.shape == (2, *size, 3) and ours.dtype == np.float32
  assert np.max(np.abs(ours - ref)) < 1e-6


@pytest.mark.parametrize("size", SIZES[:4])
def test_antialias_matches_pil_and_plain_matches_opencv(rng, size):
  x = rng.random((37, 53, 3)).astype(np.float32)
  pil = np.stack([np.asarray(Image.fromarray(x[:, :, c], mode="F").resize(size[::-1], Image.BICUBIC))
                  for c in range(3)], axis=-1)
  assert np.max(np.abs(np.asarray(image_ops.resize_bicubic(x, size, antialias=True)) - pil)) < 1e-5
  cv = cv2.resize(x, size[::-1], interpolation=cv2.INTER_CUBIC)
  assert np.max(np.abs(np.asarray(image_ops.resize_bicubic(x, size)) - cv)) < 1e-5


def test_jit_scale_helpers_and_dtypes(rng):
  x = rng.random((1, 16, 24, 3)).astype(np.float32)
  up = jax.jit(lambda a: image_ops.upscale_bicubic(a, 4))(x)
  assert up.shape == (1, 64, 96, 3)
  np.testing.assert_allclose(np.asarray(up), _torch_resize(x, (64, 96), False), atol=1e-6)
  down = image_ops.downscale_bicubic(x, 4)
  assert down.shape == (1, 4, 6, 3)
  np.testing.assert_allclose(np.asarray(down), _torch_resize(x, (4, 6), True), atol=1e-6)
  # Odd sizes round up, integer images are resized as float32, bf16 stays bf16.
  assert image_ops.downscale_bicubic(x[:, :15, :23], 4).shape == (1, 4, 6, 3)
  assert image_ops.resize_bicubic((x * 255).astype(np.uint8), (8, 8)).dtype == jnp.float32
  assert image_ops.resize_bicubic(jnp.asarray(x, jnp.bfloat16), (8, 8)).dtype == jnp.bfloat16
  # Upsampling a constant image keeps it constant (weights sum to 1, borders replicated).
  const = np.full((1, 5, 7, 3), 0.3, np.float32)
  np.testing.assert_allclose(np.asarray(image_ops.upscale_bicubic(const, 4)), 0.3, atol=1e-6)


def test_uint8_conversions_and_errors():
  img = np.array([[[0, 128, 255]]], np.uint8)
  f = image_ops.to_float01(img)
  assert f.dtype == np.float32 and f.max() == 1.0
  np.testing.assert_array_equal(image_ops.to_uint8(f), img)
  np.testing.assert_array_equal(image_ops.to_uint8(np.array([-0.2, 1.7], np.float32)), [0, 255])
  with pytest.raises(ValueError, match="unsupported image dtype"):
    image_ops.to_float01(np.zeros((2, 2, 3), np.int32))
  with pytest.raises(ValueError, match=r"\(\.\.\., H, W, C\)"):
    image_ops.resize_bicubic(np.zeros((4, 4)), (8, 8))
  with pytest.raises(ValueError, match="positive sizes"):
    image_ops.resize_bicubic(np.zeros((4, 4, 3)), (0, 8))
