"""PSNR / SSIM (cassr_jax.eval.pixel) against scikit-image and BasicSR's formulas on real photos."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cassr_jax.eval import pixel


def _pairs():
  """Three real photos (uint8, cropped to 96x128) and noisy + blurred versions of them."""
  rng = np.random.default_rng(0)
  gts, preds = [], []
  for photo in (data.astronaut(), data.coffee(), data.chelsea()):
    gt = photo[:96, :128, :3]
    blurred = cv2.GaussianBlur(gt.astype(np.float64), (5, 5), 1.0)
    pred = np.clip(np.rint(blurred + rng.normal(0, 6, gt.shape)), 0, 255).astype(np.uint8)
    gts.append(gt)
    preds.append(pred)
  return np.stack(preds), np.stack(gts)


# BasicSR's formulas, rewritten here from its psnr_ssim.py / color_util.py (BasicSR imports torchvision).
def _basicsr_y(img_uint8_rgb):
  img = img_uint8_rgb.astype(np.float32) / 255.0
  return (np.dot(img, [65.481, 128.553, 24.966]) + 16.0)[..., None].astype(np.float32)


def _basicsr_prepare(img, crop_border, test_y):
  if crop_border:
    img = img[crop_border:-crop_border, crop_border:-crop_border]
  img = _basicsr_y(img) if test_y else img
  return img.astype(np.float64)


def _basicsr_psnr(a, b, crop_border, test_y):
  a, b = _basicsr_prepare(a, crop_border, test_y), _basicsr_prepare(b, crop_border, test_y)
  return 10.0 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2))


def _basicsr_ssim_channel(a, b):
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  k = cv2.getGaussianKernel(11, 1.5)
  win = np.outer(k, k.T)
  f = lambda x: cv2.filter2D(x, -1, win)[5:-5, 5:-5]
  mu1, mu2 = f(a), f(b)
  s1, s2, s12 = f(a * a) - mu1 ** 2, f(b * b) - mu2 ** 2, f(a * b) - mu1 * mu2
  return np.mean(((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2)))


def _basicsr_ssim(a, b, crop_border, test_y):
  a, b = _basicsr_prepare(a, crop_border, test_y), _basicsr_prepare(b, crop_border, test_y)
  return np.mean([_basicsr_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[-1])])


@pytest.mark.parametrize("crop_border,test_y", [(0, False), (4, True)])
def test_psnr_ssim_match_basicsr(crop_border, test_y):
  preds, gts = _pairs()
  ours_psnr = np.asarray(pixel.psnr(preds / 255.0, gts / 255.0, crop_border=crop_border, test_y_channel=test_y))
  ours_ssim = np.asarray(pixel.ssim(preds / 255.0, gts / 255.0, crop_border=crop_border, test_y_channel=test_y))
  ref_psnr = [_basicsr_psnr(p, g, crop_border, test_y) for p, g in zip(preds, gts)]
  ref_ssim = [_basicsr_ssim(p, g, crop_border, test_y) for p, g in zip(preds, gts)]
  assert 0.3 < min(ref_ssim) < max(ref_ssim) < 0.99  # a real, non-trivial comparison
  np.testing.assert_allclose(ours_psnr, ref_psnr, rtol=0, atol=1e-4)  # dB, float32 MSE
  np.testing.assert_allclose(ours_ssim, ref_ssim, rtol=0, atol=2e-6)


def test_psnr_ssim_match_skimage():
  preds, gts = _pairs()
  ours_psnr = np.asarray(pixel.PSNR(preds / 255.0, gts / 255.0))
  ours_ssim = np.asarray(pixel.SSIM(preds / 255.0, gts / 255.0))
  for i, (p, g) in enumerate(zip(preds, gts)):
    ref_psnr = peak_signal_noise_ratio(g, p, data_range=255)
    ref_ssim = structural_similarity(
        g.astype(np.float64), p.astype(np.float64), channel_axis=-1, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=255)
    assert abs(ours_psnr[i] - ref_psnr) < 1e-4
    assert abs(ours_ssim[i] - ref_ssim) < 2e-6


def test_metric_objects_and_edge_cases():
  preds, gts = _pairs()
  x = gts[:1] / 255.0
  assert np.isinf(np.asarray(pixel.PSNR(x, x))).all()
  np.testing.assert_allclose(np.asarray(pixel.SSIM_Y(x, x)), 1.0, atol=1e-6)
  assert [m.name for m in pixel.METRICS] == ["psnr", "ssim", "psnr_y", "ssim_y"]
  assert all(m.kind == "full_reference" and m.higher_is_better and m.backend == "jax" for m in pixel.METRICS)
  cropped = pixel.PSNR_Y.with_options(crop_border=4)
  assert cropped.crop_border == 4 and cropped.test_y_channel
  with pytest.raises(ValueError, match="shapes differ"):
    pixel.PSNR(x, x[:, :64])
  with pytest.raises(ValueError, match="crop_border"):
    pixel.SSIM.with_options(crop_border=48)(x, x)
