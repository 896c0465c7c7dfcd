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

Speed: per image the work is two GEMMs (OpenCV's) with 64x64 matrices (DCT and quantisation folded into one matrix, the
inverse likewise), per block of luma and of the two half-resolution chroma planes.
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


@functools.lru_cache(maxsize=64)
def _codec_matrices(table_bytes: bytes):
  """Forward (DCT then / table) and inverse (* table then IDCT) matrices for one flattened table."""
  table = np.frombuffer(table_bytes, np.float32).astype(np.float64)
  m = dct_matrix()
  if np.all(table == 0):
    return m.astype(np.float32), None
  return (m / table[None, :]).astype(np.float32), (table[:, None] * m.T).astype(np.float32)


def _blocks(plane: np.ndarray) -> np.ndarray:
  """(..., H, W) -> (N, 64) 8x8 blocks in raster order."""
  *lead, h, w = plane.shape
  return plane.reshape(*lead, h // 8, 8, w // 8, 8).swapaxes(-3, -2).reshape(-1, 64)


def _unblocks(blocks: np.ndarray, shape) -> np.ndarray:
  *lead, h, w = shape
  return blocks.reshape(*lead, h // 8, w // 8, 8, 8).swapaxes(-3, -2).reshape(shape)


def _round_trip(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Blockwise DCT, quantisation with rounding, dequantisation and inverse DCT of (..., H, W) planes."""
  fwd, inv = _codec_matrices(np.ascontiguousarray(table, np.float32).tobytes())
  if inv is None:  # factor 0 (quality 100): nothing is quantised
    return plane
  b = _blocks(plane - np.float32(128))
  # OpenCV's GEMM: it follows cv2.setNumThreads (1 in data workers), where numpy's BLAS may spin threads.
  q = np.rint(cv2.gemm(b, fwd, 1.0, None, 0.0))
  out = cv2.gemm(q, inv, 1.0, None, 0.0)
  out += np.float32(128)
  return _unblocks(out, plane.shape)


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
  x = np.clip(img, 0.0, 1.0)
  if ph or pw:
    x = cv2.copyMakeBorder(x, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
  to_ycc = (RGB_TO_YCBCR[:, ::-1] if bgr else RGB_TO_YCBCR) * np.float32(255)  # 0-255 scale, Cb/Cr - 128
  hh, ww = x.shape[:2]
  y = cv2.transform(x, to_ycc[:1])
  # 4:2:0: each chroma sample is the mean of its 2x2 block. The colour transform is linear, so this is the
  # chroma of the 2x2 mean of RGB (cv2's area resize by exactly 2), which is cheaper to compute.
  c = cv2.transform(cv2.resize(x, (ww // 2, hh // 2), interpolation=cv2.INTER_AREA), to_ycc[1:])
  c = c.transpose(2, 0, 1) + np.float32(128)  # (2, H/2, W/2) planes with JPEG's +128 offset
  y = _round_trip(y, luma_table)
  c = _round_trip(c, chroma_table) - np.float32(128)
  # Back to colour: chroma terms at half resolution, repeated over 2x2 blocks (nearest), plus luma.
  to_rgb = CHROMA_TO_RGB[::-1] if bgr else CHROMA_TO_RGB
  chroma_rgb = cv2.transform(np.ascontiguousarray(c.transpose(1, 2, 0)), to_rgb)  # (H/2, W/2, 3)
  out = cv2.resize(chroma_rgb, (ww, hh), interpolation=cv2.INTER_NEAREST)
  out += y[..., None]
  out = out[:h, :w]
  out = np.clip(out, 0, 255, out=out)
  out *= np.float32(1 / 255)
  return np.ascontiguousarray(out)


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
