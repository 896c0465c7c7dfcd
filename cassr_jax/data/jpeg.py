"""JPEG round trips for the degradation: DiffJPEG's float codec in numpy, and libjpeg through OpenCV.

`diffjpeg` reproduces what Real-ESRGAN trains with (BasicSR's DiffJPEG with differentiable=False, itself
from mlomnitz/DiffJPEG), step by step:
  * the input (clipped to [0, 1], as Real-ESRGAN clamps before each JPEG) is zero-padded at the bottom/right
    to a multiple of 16, scaled by 255, never rounded to 8 bits;
  * JPEG's full-range YCbCr (ITU-R 601 weights, chroma offset 128);
  * 4:2:0 chroma: each chroma sample is the mean of its 2x2 block (average pooling);
  * 8x8 orthonormal DCT of (value - 128) per block, then round(coefficient / (table * factor)) with
    round-half-to-even (torch.round), and back: coefficient * (table * factor), inverse DCT, + 128;
  * the tables are JPEG's standard luma / chroma tables (Annex K) TRANSPOSED (DiffJPEG stores them as
    `table.T` while its DCT indexes coefficients [row frequency, column frequency], so the horizontal and
    vertical frequencies of the standard table swap), as float, scaled by the float factor
    quality_to_factor(q) = 50 / q for q < 50, else 2 - q / 50, with no rounding or clamping of the entries;
  * chroma upsampled by repeating each sample over its 2x2 block (nearest), YCbCr -> RGB, clipped to
    [0, 255], divided by 255, cropped back: float out (the quality is a float too).
One deliberate extension: at quality 100 the factor is 0 and DiffJPEG divides by zero (NaN output); here
factor 0 means no quantisation (the limit q -> 100), so configs may include 100.

`libjpeg` is the real codec (OpenCV's libjpeg, integer quality, 8-bit in and out). Its decoder upsamples
chroma smoothly (fancy upsampling), so its chroma noise is much lower than DiffJPEG's: measured on x4plus
LR images, mean |C - median3(C)| over Cb/Cr is 0.26-0.29 with libjpeg vs 0.70 with Real-ESRGAN's DiffJPEG.

Speed: luma and both half-resolution chroma planes go through the codec as one plane; the blockwise 2-D DCT
and its inverse are separable 8-point transforms (OpenCV GEMMs with an 8x8 matrix) along rows, a transpose,
and again, so quantisation is one elementwise divide / round / multiply with a tiled table.
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from cassr_jax.image_ops import to_uint8

JPEG_CODECS = ("diffjpeg", "libjpeg")

# JPEG Annex K tables, K.1 (luminance) and K.2 (chrominance), in the standard's row-major print order.
STD_LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)
STD_CHROMA_TABLE = np.full((8, 8), 99, np.float32)
STD_CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

# Full-range YCbCr of JPEG (JFIF), rows = output channel, columns = R, G, B.
RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                        np.float32)
# Inverse (DiffJPEG's constants): R = Y + 1.402 Cr', G = Y - 0.344136 Cb' - 0.714136 Cr', B = Y + 1.772 Cb'.
CHROMA_TO_RGB = np.array([[0.0, 1.402], [-0.344136, -0.714136], [1.772, 0.0]], np.float32)


def quality_to_factor(quality: float) -> float:
  """DiffJPEG's table scale for a (float) quality in (0, 100]."""
  quality = float(quality)
  if not 0.0 < quality <= 100.0:
    raise ValueError(f"JPEG quality {quality} is not in (0, 100]")
  return 50.0 / quality if quality < 50 else 2.0 - quality / 50.0


def quant_tables(quality: float) -> tuple[np.ndarray, np.ndarray]:
  """(luma, chroma) 8x8 float32 tables as DiffJPEG applies them: indexed [row freq, column freq]."""
  factor = np.float32(quality_to_factor(quality))
  return STD_LUMA_TABLE.T * factor, STD_CHROMA_TABLE.T * factor


@functools.lru_cache(maxsize=1)
def dct_matrix() -> np.ndarray:
  """(64, 64) float64 orthonormal 2-D DCT-II: coef[u*8+v] = sum_{x,y} block[x*8+y] * M[x*8+y, u*8+v]."""
  n = np.arange(8)
  alpha = np.where(n == 0, 1 / math.sqrt(2), 1.0)
  basis = np.cos((2 * n[:, None] + 1) * n[None, :] * np.pi / 16) * alpha[None, :] / 2  # [pixel, freq]
  return np.einsum("xu,yv->xyuv", basis, basis).reshape(64, 64)


@functools.lru_cache(maxsize=1)
def _dct_basis() -> tuple[np.ndarray, np.ndarray]:
  """(basis, basis.T) float32: the 8-point orthonormal DCT-II, basis[pixel, freq] (dct_matrix's factor)."""
  n = np.arange(8)
  alpha = np.where(n == 0, 1 / math.sqrt(2), 1.0)
  basis = np.cos((2 * n[:, None] + 1) * n[None, :] * np.pi / 16) * alpha[None, :] / 2
  return basis.astype(np.float32), np.ascontiguousarray(basis.T, np.float32)


def _rows8(plane: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Applies an 8x8 matrix to every run of 8 pixels along the rows of a (H, W) plane, W % 8 == 0."""
  # OpenCV's GEMM (the OpenBLAS inside its wheel: data workers limit it to one thread, images.use_one_core).
  return cv2.gemm(plane.reshape(-1, 8), matrix, 1.0, None, 0.0).reshape(plane.shape)


def _quantise_blocks(plane: np.ndarray, table_t: np.ndarray) -> np.ndarray:
  """Blockwise 2-D DCT, round(coefficient / table), * table and inverse DCT of a (H, W) plane (H, W % 8 == 0).

  The 2-D DCT is separable: 8-point transforms along the rows, a transpose, the same along the (former)
  columns, which leaves each block's coefficient [u, v] at (8 j + v, 8 i + u) of the transposed plane;
  `table_t` is the quantisation table laid out the same way, (W, H). About 8x fewer multiply-adds than one
  64x64 matrix per block, and no block gathers.
  """
  basis, basis_t = _dct_basis()
  coef = _rows8(cv2.transpose(_rows8(plane, basis)), basis)
  np.divide(coef, table_t, out=coef)
  np.rint(coef, out=coef)  # round half to even, as torch.round
  np.multiply(coef, table_t, out=coef)
  return _rows8(cv2.transpose(_rows8(coef, basis_t)), basis_t)


def diffjpeg(img: np.ndarray, quality: float, *, bgr: bool = False) -> np.ndarray:
  """DiffJPEG's JPEG round trip of an (H, W, 3) float image in [0, 1] (RGB, or BGR with bgr=True).

  Returns float32 (H, W, 3) in [0, 1] (not rounded to 8 bits), channels in the input's order.
  """
  img = np.asarray(img, np.float32)
  if img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f"diffjpeg: expected an (H, W, 3) image, got {img.shape}")
  luma_table, chroma_table = quant_tables(quality)
  h, w = img.shape[:2]
  ph, pw = -h % 16, -w % 16
  if ph or pw:
    x = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
    np.clip(x, 0.0, 1.0, out=x)
  else:
    x = np.clip(img, 0.0, 1.0)
  hh, ww = x.shape[:2]
  # 0-255 scale; luma with JPEG's -128 level shift (the affine column), chroma centred (Cb - 128, Cr - 128).
  to_ycc = np.zeros((3, 4), np.float32)
  to_ycc[:, :3] = (RGB_TO_YCBCR[:, ::-1] if bgr else RGB_TO_YCBCR) * np.float32(255)
  to_ycc[0, 3] = -128
  # One plane holds everything: luma (hh, ww) on top, the Cb and Cr planes (hh/2, ww/2) side by side below.
  # 4:2:0: each chroma sample is the mean of its 2x2 block. The colour transform is linear, so this is the
  # chroma of the 2x2 mean of RGB; an exact halving with INTER_LINEAR samples every 2x2 block's centre,
  # i.e. averages it with weights 1/4 (= INTER_AREA here, and cheaper).
  chroma = cv2.transform(cv2.resize(x, (ww // 2, hh // 2), interpolation=cv2.INTER_LINEAR), to_ycc[1:])
  plane = np.empty((hh + hh // 2, ww), np.float32)
  plane[:hh] = cv2.transform(x, to_ycc[:1])
  plane[hh:] = chroma.transpose(0, 2, 1).reshape(hh // 2, ww)  # row r: Cb[r, :], then Cr[r, :]
  if quality_to_factor(quality) > 0:  # factor 0 (quality 100): nothing is quantised
    table_t = np.empty((ww, hh + hh // 2), np.float32)
    table_t[:, :hh] = np.tile(luma_table.T, (ww // 8, hh // 8))
    table_t[:, hh:] = np.tile(chroma_table.T, (ww // 8, hh // 16))
    plane = _quantise_blocks(plane, table_t)
  # Back to colour: chroma repeated over 2x2 blocks (nearest), then one affine map of (Y, Cb, Cr) per pixel
  # (+128 restores the luma level), scaled to [0, 1].
  cbcr = cv2.merge([plane[hh:, :ww // 2], plane[hh:, ww // 2:]])
  cbcr = cv2.resize(cbcr, (ww, hh), interpolation=cv2.INTER_NEAREST)
  to_rgb = np.zeros((3, 4), np.float32)
  to_rgb[:, 0] = 1
  to_rgb[:, 1:3] = CHROMA_TO_RGB[::-1] if bgr else CHROMA_TO_RGB
  to_rgb[:, 3] = 128
  to_rgb *= np.float32(1 / 255)
  out = cv2.transform(cv2.merge([plane[:h, :w], cbcr[:h, :w]]), to_rgb)
  return np.clip(out, 0, 1, out=out)


def libjpeg(img: np.ndarray, quality: float) -> np.ndarray:
  """Real JPEG round trip (libjpeg via OpenCV, 4:2:0) of a float32 BGR image in [0, 1]; quality rounded."""
  u8 = to_uint8(img)
  ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, round(quality)])
  if not ok:
    raise RuntimeError("JPEG encoding failed")
  out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
  if out.ndim == 2 and img.ndim == 3:
    out = out[..., None]
  return out.astype(np.float32) * np.float32(1 / 255)


def jpeg_round_trip(img: np.ndarray, quality: float, codec: str) -> np.ndarray:
  """float32 BGR [0, 1] -> float32 BGR [0, 1] through `codec` ('diffjpeg' or 'libjpeg')."""
  if codec == "diffjpeg":
    return diffjpeg(img, quality, bgr=True)
  if codec == "libjpeg":
    return libjpeg(img, quality)
  raise ValueError(f"unknown jpeg_codec {codec!r}; known: {JPEG_CODECS}")


def chroma_noise(rgb: np.ndarray) -> float:
  """Mean |C - median3x3(C)| over the Cb and Cr planes of an 8-bit-scale RGB image (the issue's statistic)."""
  ycc = cv2.cvtColor(np.asarray(rgb, np.float32), cv2.COLOR_RGB2YCrCb)
  total = 0.0
  for ch in (1, 2):
    plane = ycc[..., ch]
    total += float(np.abs(plane - cv2.medianBlur(plane, 3)).mean())
  return total / 2
