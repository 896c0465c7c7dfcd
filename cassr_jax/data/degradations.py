"""Real-ESRGAN second-order degradation in numpy + OpenCV (runs in grain worker processes).

Pipeline per HR crop (every number comes from the config; presets in cassr_jax.data.presets):
  0. USM sharpening of the HR (`usm_sharpen`, on in x4plus as in Real-ESRGAN): the LR is made from the
     sharpened HR; the returned target is the plain HR unless `usm_target` (Real-ESRGAN's L1/perceptual
     target) asks for the sharpened one;
  1. stage 1: blur (one of six kernel families, or a 2-D sinc) -> random resize (up/down/keep, random mode)
     -> Gaussian or Poisson noise (colour or gray) -> clip -> JPEG (`jpeg_codec`, see cassr_jax.data.jpeg);
  2. stage 2 (run with probability `second_stage_prob`, 1 in both presets): blur with probability
     `stage2.blur_prob` -> resize to (H/scale*s, W/scale*s) -> noise;
  3. with probability `final.resize_first_prob` [resize to H/scale + final sinc (probability
     `final.sinc_prob`), then JPEG with stage 2's quality], else [JPEG, then resize + final sinc];
  4. round to 8 bits.
The HR itself must be a multiple of `scale` in both sides; the LR is exactly (H/scale, W/scale).

Resizes, against Real-ESRGAN's torch F.interpolate:
  * 'area' is torch's: adaptive average pooling (output pixel i averages input pixels
    floor(i*n/m) .. ceil((i+1)*n/m) - 1 with equal weights), computed with prefix sums, for down- and
    up-scaling (equal to torch to float32 rounding, ~1e-6; tests/test_degradations.py). OpenCV's INTER_AREA
    weights partially covered pixels by their coverage instead: 1.2-1.9 levels mean difference at x0.3 / x0.75.
  * 'bilinear' / 'bicubic' are cv2 INTER_LINEAR / INTER_CUBIC, identical to torch's align_corners=False
    resizes to an explicit size (half-pixel centres, a = -0.75, no antialiasing). Real-ESRGAN's stage-1
    resize passes scale_factor instead (torch then maps output x to (x + 0.5) / s - 0.5 rather than
    (x + 0.5) * n / m - 0.5): the two grids differ by less than one input pixel at the far border (at most
    (n - floor(n s) / s), e.g. 0.6 px for n = 512, s = 0.77), a sub-pixel shift we do not reproduce.

Determinism: every random choice is drawn from numpy Generators seeded by a SeedSequence built from
(seed, epoch, example index) (`example_seed`); the scalar parameters come from one stream with a fixed number
of draws per image (drawn even when unused, so adding a branch never shifts later draws), each stage's noise
field from its own stream. The same triple gives the same LR bit for bit, whatever the worker or order.

Implementation notes (speed; each is exact up to float32 rounding unless stated):
  * images are processed as float32 BGR in [0, 1] (OpenCV's order; the JPEG codecs take BGR);
  * blur kernels are generated padded to `kernel_pad_to` (21) as in Real-ESRGAN, but filtered with their
    support only: entries below 1e-9 of the kernel maximum are trimmed (changes the result by < 5e-7),
    rank-1 kernels use cv2.sepFilter2D, 13x13 kernels are split into row strips so that
    OpenCV keeps its direct (non-DFT) path, and from 15x15 up the image is filtered through whole-image
    DFTs (about 2x faster than both at 512x512; the method depends only on the kernel, never on timing, so
    results stay bit-reproducible);
  * Poisson noise is sampled exactly by inverse-CDF tables: the Poisson rate only takes 256 values
    (rounded 8-bit level x the power-of-two level count), so per-level quantile tables turn the draw into a
    table look-up (about 4x faster than Generator.poisson).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import cv2
import numpy as np

from cassr_jax.data import jpeg as jpeg_codecs
from cassr_jax.data.presets import (  # noqa: F401 - presets re-exported for existing callers
  KERNEL_TYPES,
  PRESETS,
  RESIZE_DIRECTIONS,
  RESIZE_MODES,
  Settings,
  _Stage,
  mild_preset,
  preset,
  settings,
  x4plus_preset,
)
from cassr_jax.image_ops import to_uint8

_CV2_RESIZE = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_GRAY_BGR = np.array([0.114, 0.587, 0.299], np.float32)  # ITU-R 601 luma weights in B, G, R order


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------

def bessel_j1(x: np.ndarray) -> np.ndarray:
  """Bessel function J1 via Bessel's integral, trapezoid rule over a full period.

  The trapezoid rule is spectrally accurate for periodic integrands: with 128 nodes the error is below
  1e-15 for |x| < 60, far beyond the |x| <= pi * 10 * sqrt(2) a 21x21 sinc kernel needs. (Avoids a scipy
  dependency in the workers.)
  """
  x = np.asarray(x, np.float64)
  if np.max(np.abs(x), initial=0.0) > 60:
    raise ValueError("bessel_j1: |x| > 60 is outside the accurate range")
  tau = np.arange(128) * (2 * np.pi / 128)
  return np.mean(np.sin(tau) * np.sin(x[..., None] * np.sin(tau)), axis=-1)


def _grid(size: int):
  ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
  return np.meshgrid(ax, ax)  # xx varies along columns, yy along rows


def _quadratic_form(size, sigma_x, sigma_y, theta):
  """d^T Sigma^-1 d on the grid, Sigma = R diag(sx^2, sy^2) R^T."""
  xx, yy = _grid(size)
  c, s = math.cos(theta), math.sin(theta)
  # Rotate the grid into the kernel's principal axes: u = R^T d.
  u = c * xx + s * yy
  v = -s * xx + c * yy
  return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def gaussian_kernel(size, sigma_x, sigma_y, theta):
  k = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta))
  return k / k.sum()


def generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta):
  k = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta)
  return k / k.sum()


def plateau_kernel(size, sigma_x, sigma_y, theta, beta):
  k = 1.0 / (_quadratic_form(size, sigma_x, sigma_y, theta) ** beta + 1.0)
  return k / k.sum()


def sinc_kernel(size, cutoff):
  """Circular low-pass (2-D sinc) filter: cutoff * J1(cutoff r) / (2 pi r), centre cutoff^2 / (4 pi)."""
  xx, yy = _grid(size)
  # J1 only at the distinct radii (~1/7 of the grid at 21x21: the kernel is symmetric).
  sq, where = np.unique(xx ** 2 + yy ** 2, return_inverse=True)
  r = np.sqrt(sq)
  centre = r == 0
  r_safe = np.where(centre, 1.0, r)
  values = cutoff * bessel_j1(cutoff * r_safe) / (2 * np.pi * r_safe)
  values[centre] = cutoff ** 2 / (4 * np.pi)
  k = values[where].reshape(xx.shape)
  return k / k.sum()


def pad_kernel(kernel, size):
  pad = (size - kernel.shape[0]) // 2
  return np.pad(kernel, pad) if pad > 0 else kernel


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """A sampled kernel: kind in KERNEL_TYPES + ('sinc', 'pulse'); size = odd support; pad_to = array size."""
  kind: str
  size: int
  pad_to: int
  sigma_x: float = 0.0
  sigma_y: float = 0.0
  theta: float = 0.0
  beta: float = 1.0
  cutoff: float = 0.0


def build_kernel(spec: KernelSpec) -> np.ndarray:
  """The float64 kernel of `spec`, zero-padded to spec.pad_to x spec.pad_to, summing to one."""
  kind, size = spec.kind, spec.size
  if kind in ("iso", "aniso"):
    k = gaussian_kernel(size, spec.sigma_x, spec.sigma_y, spec.theta)
  elif kind.startswith("generalized"):
    k = generalized_gaussian_kernel(size, spec.sigma_x, spec.sigma_y, spec.theta, spec.beta)
  elif kind.startswith("plateau"):
    k = plateau_kernel(size, spec.sigma_x, spec.sigma_y, spec.theta, spec.beta)
  elif kind == "sinc":
    k = sinc_kernel(size, spec.cutoff)
  elif kind == "pulse":
    k = np.zeros((size, size))
    k[size // 2, size // 2] = 1.0
  else:
    raise ValueError(f"unknown kernel kind {kind!r}")
  return pad_kernel(k, spec.pad_to)


def _sample_kernel(rng: np.random.Generator, st: _Stage, sizes, pad_to) -> KernelSpec:
  # Always 8 draws, in this order, whatever the branch.
  u_sinc, u_size, u_kind, t_sx, t_sy, t_theta, u_side, t_shape = rng.random(8)
  size = sizes[min(int(u_size * len(sizes)), len(sizes) - 1)]
  if u_sinc < st.sinc_prob:
    lo, hi = st.sinc_cutoff_small if size < st.sinc_small_size else st.sinc_cutoff_large
    return KernelSpec("sinc", size, pad_to, cutoff=lo + t_shape * (hi - lo))
  kind = st.kernel_list[min(int(np.searchsorted(st.kernel_cum, u_kind, side="right")), len(st.kernel_list) - 1)]
  s_lo, s_hi = st.blur_sigma
  sigma_x = s_lo + t_sx * (s_hi - s_lo)
  if kind.endswith("iso") and not kind.endswith("aniso"):
    sigma_y, theta = sigma_x, 0.0
  else:
    sigma_y = s_lo + t_sy * (s_hi - s_lo)
    r_lo, r_hi = st.rotation_range
    theta = r_lo + t_theta * (r_hi - r_lo)
  beta = 1.0
  if kind.startswith(("generalized", "plateau")):
    b_lo, b_hi = st.betag_range if kind.startswith("generalized") else st.betap_range
    # Half the time U[lo, 1], else U[1, hi] (so a range starting at 1 gives beta = 1 half the time).
    beta = b_lo + t_shape * (1.0 - b_lo) if u_side < 0.5 else 1.0 + t_shape * (b_hi - 1.0)
  return KernelSpec(kind, size, pad_to, sigma_x, sigma_y, theta, beta)


def _sample_final_sinc(rng, s: Settings) -> KernelSpec:
  u_apply, u_size, t_cut = rng.random(3)
  if u_apply >= s.final_sinc_prob:
    return KernelSpec("pulse", 1, s.kernel_pad_to)
  size = s.kernel_sizes[min(int(u_size * len(s.kernel_sizes)), len(s.kernel_sizes) - 1)]
  lo, hi = s.final_sinc_cutoff
  return KernelSpec("sinc", size, s.kernel_pad_to, cutoff=lo + t_cut * (hi - lo))


# --------------------------------------------------------------------------------------------------------
# Sampled parameters
# --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StageParams:
  blur: bool
  kernel: KernelSpec
  resize: str  # 'up' | 'down' | 'keep'
  resize_scale: float
  resize_mode: str
  noise: str  # 'gaussian' | 'poisson'
  gray_noise: bool
  noise_sigma: float  # 0-255 scale
  poisson_scale: float
  jpeg_quality: float  # a float for diffjpeg; an integer value for libjpeg


@dataclasses.dataclass(frozen=True)
class DegradationParams:
  stage1: StageParams
  stage2: StageParams
  final_sinc: KernelSpec
  final_resize_first: bool
  final_resize_mode: str
  second_stage: bool = True  # False: stage 2's blur, resize and noise are skipped (the final step still runs)


def _sample_stage(rng, st: _Stage, kernel: KernelSpec, codec: str) -> StageParams:
  u_blur, u_dir, t_scale, u_mode, u_noise, u_gray, t_sigma, t_poisson, t_quality = rng.random(9)
  q_lo, q_hi = st.jpeg_range
  if codec == "libjpeg":  # integer quality, uniform over [lo, hi] inclusive
    lo_i, hi_i = math.ceil(q_lo), math.floor(q_hi)
    quality = float(min(lo_i + int(t_quality * (hi_i - lo_i + 1)), hi_i))
  else:  # DiffJPEG: a float quality, as Real-ESRGAN draws it
    quality = q_lo + t_quality * (q_hi - q_lo)
  direction = RESIZE_DIRECTIONS[min(int(np.searchsorted(st.resize_cum, u_dir, side="right")), 2)]
  lo, hi = st.resize_range
  if direction == "up":
    scale = 1.0 + t_scale * (hi - 1.0)
  elif direction == "down":
    scale = lo + t_scale * (1.0 - lo)
  else:
    scale = 1.0
  n_lo, n_hi = st.noise_range
  p_lo, p_hi = st.poisson_scale_range
  return StageParams(
      blur=bool(u_blur < st.blur_prob), kernel=kernel, resize=direction, resize_scale=float(scale),
      resize_mode=st.resize_modes[min(int(u_mode * len(st.resize_modes)), len(st.resize_modes) - 1)],
      noise="gaussian" if u_noise < st.gaussian_noise_prob else "poisson",
      gray_noise=bool(u_gray < st.gray_noise_prob),
      noise_sigma=float(n_lo + t_sigma * (n_hi - n_lo)),
      poisson_scale=float(p_lo + t_poisson * (p_hi - p_lo)), jpeg_quality=float(quality))


def sample_params(config, rng: np.random.Generator) -> DegradationParams:
  """Draws every random choice of one degradation (a fixed number of draws from `rng`)."""
  s = settings(config)
  k1 = _sample_kernel(rng, s.stage1, s.kernel_sizes, s.kernel_pad_to)
  k2 = _sample_kernel(rng, s.stage2, s.kernel_sizes, s.kernel_pad_to)
  final_sinc = _sample_final_sinc(rng, s)
  stage1 = _sample_stage(rng, s.stage1, k1, s.jpeg_codec)
  stage2 = _sample_stage(rng, s.stage2, k2, s.jpeg_codec)
  u_order, u_mode, u_second = rng.random(3)
  modes = s.final_resize_modes
  return DegradationParams(stage1, stage2, final_sinc, bool(u_order < s.final_resize_first_prob),
                           modes[min(int(u_mode * len(modes)), len(modes) - 1)],
                           second_stage=bool(u_second < s.second_stage_prob))


# --------------------------------------------------------------------------------------------------------
# Operations on float32 images in [0, 1]
# --------------------------------------------------------------------------------------------------------

_DIRECT_MAX_AREA = 129  # OpenCV switches filter2D to its DFT path at >= 130 kernel taps
_FFT_MIN_SIZE = 15  # from 15x15 up, one whole-image DFT per channel beats row strips (measured ~1.3-2x)


def _dft_size(h: int, w: int, n: int) -> tuple[int, int]:
  return cv2.getOptimalDFTSize(h + n - 1), cv2.getOptimalDFTSize(w + n - 1)


def _kernel_spectrum(kernel: np.ndarray, fh: int, fw: int) -> np.ndarray:
  """cv2.dft (packed) of an n x n kernel placed at the top-left of an fh x fw zero plane."""
  n = kernel.shape[0]
  plane = np.zeros((fh, fw), np.float32)
  plane[:n, :n] = kernel
  return cv2.dft(plane, nonzeroRows=n)


def _correlate_dft(img: np.ndarray, n: int, spectrum: np.ndarray) -> np.ndarray:
  """Correlation of img with the centred n x n kernel whose _kernel_spectrum is `spectrum`, reflect-101
  borders, through whole-image DFTs: the image padded by the kernel radius, each channel multiplied by the
  conjugated spectrum. The padded size is at least H + n - 1, so the wanted outputs never wrap around."""
  r = n // 2
  h, w = img.shape[:2]
  fh, fw = spectrum.shape
  # Beyond the reflect-101 border the padding is arbitrary (only wrapped-around outputs read it).
  padded = cv2.copyMakeBorder(img, r, fh - h - r, r, fw - w - r, cv2.BORDER_REFLECT_101)
  channels = []
  for plane in cv2.split(padded) if padded.ndim == 3 else [padded]:
    product = cv2.mulSpectrums(cv2.dft(plane), spectrum, 0, conjB=True)
    channels.append(cv2.idft(product, flags=cv2.DFT_SCALE | cv2.DFT_REAL_OUTPUT, nonzeroRows=h)[:h, :w])
  return _keep_channels(cv2.merge(channels) if len(channels) > 1 else np.ascontiguousarray(channels[0]), img)


def _filter2d_dft(img: np.ndarray, k32: np.ndarray) -> np.ndarray:
  """filter2d through whole-image DFTs (~2x faster than cv2.filter2D's tiled DFT path at 512x512)."""
  n = k32.shape[0]
  return _correlate_dft(img, n, _kernel_spectrum(k32, *_dft_size(*img.shape[:2], n)))


def _trim(kernel: np.ndarray) -> np.ndarray:
  """Crops the zero-weight border (entries < 1e-9 of the max), keeping the kernel centred."""
  mask = np.abs(kernel) > 1e-9 * np.abs(kernel).max()
  rows, cols = np.nonzero(mask)
  c = kernel.shape[0] // 2
  r = max(c - rows.min(), rows.max() - c, c - cols.min(), cols.max() - c)
  return kernel[c - r:c + r + 1, c - r:c + r + 1]


def _separate(k: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """(col, row) float32 with k = outer(col, row) to 1e-7 of max |k|, or None when k is not rank one.

  A rank-one kernel with a positive centre c is outer(k[:, c], k[c, :]) / k[c, c] (a tenth of an SVD's cost).
  """
  c = k.shape[0] // 2
  centre = k[c, c]
  if centre <= 0:
    return None
  col, row = k[:, c] / math.sqrt(centre), k[c, :] / math.sqrt(centre)
  if np.max(np.abs(k - np.outer(col, row))) > 1e-7 * np.max(np.abs(k)):
    return None
  return col.astype(np.float32), row.astype(np.float32)


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Correlates img (H, W, C float32) with a centred odd kernel, reflect-101 borders (torch 'reflect')."""
  k = _trim(np.asarray(kernel, np.float64))
  n = k.shape[0]
  if n == 1:
    return img * np.float32(k[0, 0]) if k[0, 0] != 1 else img
  separable = _separate(k)
  if separable is not None:  # isotropic / axis-aligned Gaussians
    col, row = separable
    return _keep_channels(cv2.sepFilter2D(img, -1, row, col, borderType=cv2.BORDER_REFLECT_101), img)
  k32 = k.astype(np.float32)
  if n >= _FFT_MIN_SIZE:
    return _keep_channels(_filter2d_dft(img, k32), img)
  if n * n <= _DIRECT_MAX_AREA:
    return _keep_channels(cv2.filter2D(img, -1, k32, borderType=cv2.BORDER_REFLECT_101), img)
  # Row strips, each small enough for the direct path, applied to an explicitly padded image and summed.
  h, w = img.shape[:2]
  r = n // 2
  padded = cv2.copyMakeBorder(img, r, r, r, r, cv2.BORDER_REFLECT_101)
  rows_per_strip = max(1, _DIRECT_MAX_AREA // n)
  out = None
  for r0 in range(0, n, rows_per_strip):
    strip = k32[r0:r0 + rows_per_strip]
    # With anchor (0, 0): dst[y, x] = sum_ij strip[i, j] * src[y + i, x + j]; we need rows y + r0.
    src = padded[r0:r0 + h + strip.shape[0] - 1]
    part = cv2.filter2D(src, -1, strip, anchor=(0, 0), borderType=cv2.BORDER_REFLECT_101)[:h, :w]
    out = part if out is None else cv2.add(out, part)
  return _keep_channels(out, img)


def _keep_channels(out, like):
  # OpenCV drops a trailing channel axis of size 1.
  return out[..., None] if out.ndim == 2 and like.ndim == 3 else out


def _area_matrix(n: int, size: int):
  """(size, n) sparse float32 matrix of torch's adaptive average pooling along one axis: row i averages
  inputs floor(i n / size) .. ceil((i + 1) n / size) - 1 with equal weights."""
  import scipy.sparse  # (scipy comes with jax)
  i = np.arange(size)
  start = i * n // size
  length = -(-(i + 1) * n // size) - start  # ceil((i + 1) n / size) - start
  indptr = np.concatenate([[0], np.cumsum(length)])
  indices = np.repeat(start, length) + (np.arange(indptr[-1]) - np.repeat(indptr[:-1], length))
  weights = np.repeat((1.0 / length).astype(np.float32), length)
  return scipy.sparse.csr_matrix((weights, indices, indptr), shape=(size, n))


def _area_rows(img: np.ndarray, size: int) -> np.ndarray:
  """Adaptive average pooling of the rows of img (H, W, C): one sparse-matrix product with the (H, W*C)
  image, a single pass whatever the factor (the same float32 sums, in the same order, as weighted row
  gathers added one by one, ~2x faster)."""
  n = img.shape[0]
  if n == size:
    return img
  return (_area_matrix(n, size) @ img.reshape(n, -1)).reshape((size,) + img.shape[1:])


def area_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """torch F.interpolate(mode='area') = adaptive_avg_pool2d, for (H, W, C) float32, up or down."""
  if img.shape[0] % height == 0 and img.shape[1] % width == 0:
    # Integer factors: every window is whole, where OpenCV's INTER_AREA is the same average (and faster).
    return _keep_channels(cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA), img)
  out = _area_rows(img, height)
  if out.shape[1] != width:  # columns: pool the rows of the transposed image (cv2.transpose is cheap)
    flipped = cv2.transpose(out).reshape(out.shape[1], height, -1)
    out = cv2.transpose(_area_rows(flipped, width)).reshape(height, width, -1)
  return out


def resize(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
  """Resize to (height, width) with torch's semantics for 'area', 'bilinear' and 'bicubic' (module doc)."""
  if img.shape[0] == height and img.shape[1] == width:
    return img
  if mode == "area":
    return area_resize(img, height, width)
  return _keep_channels(cv2.resize(img, (width, height), interpolation=_CV2_RESIZE[mode]), img)


def gaussian_noise(rng, shape, sigma, gray) -> np.ndarray:
  h, w, c = shape
  noise = rng.standard_normal((h, w, 1 if gray else c), dtype=np.float32)
  noise *= np.float32(sigma / 255.0)
  return noise


_POISSON_BIN_BITS = 12  # 4096 quantile bins per 8-bit level


@functools.lru_cache(maxsize=16)
def _poisson_tables(vals: float):
  """Inverse-CDF tables for the 256 Poisson rates k/255*vals (k = 8-bit level).

  cdf[k, j] = P(X <= j); stacked = (cdf + k) flattened, for one vectorised binary search;
  packed[k << B | m] = lo | ambiguous << 15 | multi << 14 (B = _POISSON_BIN_BITS), where lo = smallest j
  with cdf[k, j] >= m / 2^B, `ambiguous` says that the bin [m / 2^B, (m + 1) / 2^B) also reaches larger j,
  and `multi` that it reaches beyond lo + 1.
  """
  bins = 1 << _POISSON_BIN_BITS
  lam = np.arange(256, dtype=np.float64) / 255.0 * vals
  jmax = int(vals + 12 * math.sqrt(vals) + 20)  # P(X > jmax) < 1e-25 for every rate here
  j = np.arange(jmax + 1, dtype=np.float64)
  log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, jmax + 1)))])
  log_lam = np.log(np.maximum(lam, 1e-300))[:, None]
  pmf = np.exp(j[None] * log_lam - lam[:, None] - log_fact[None])
  pmf[0] = 0.0
  pmf[0, 0] = 1.0  # rate 0: X = 0
  cdf = np.cumsum(pmf, axis=1)
  cdf[:, -1] = 1.0  # the far tail folds into the last entry
  edges = np.arange(bins + 1, dtype=np.float64) / bins
  quantile = np.stack([np.searchsorted(row, edges, side="left") for row in cdf])
  quantile = np.minimum(quantile, jmax)
  lo, hi = quantile[:, :-1], quantile[:, 1:]
  packed = (lo | ((hi > lo).astype(np.int64) << 15) | ((hi > lo + 1).astype(np.int64) << 14))
  stacked = (cdf + np.arange(256)[:, None]).ravel()
  return cdf, packed.astype(np.uint16).ravel(), stacked


def poisson_sample_levels(rng, levels: np.ndarray, vals: float) -> np.ndarray:
  """Poisson(levels/255*vals) samples for uint8 `levels` (vals <= 256), exact inverse-CDF sampling.

  One 32-bit uniform u per sample, X = min{j : cdf[k, j] > u}: its top bits pick a quantile bin, and a
  table look-up resolves the ~97% of samples whose bin holds a single value; where the bin straddles one
  step of the CDF, one comparison with that step decides, and the rare rest use a binary search of the CDF.
  Exact up to the 2^-32 resolution of u (the bin count only changes how, never which, value is drawn).
  """
  if vals > 256:
    raise ValueError(f"poisson_sample_levels: vals={vals} > 256")
  cdf, packed, stacked = _poisson_tables(float(vals))
  bits = rng.integers(0, 1 << 32, size=levels.shape, dtype=np.uint32)
  idx = levels.astype(np.uint32) << _POISSON_BIN_BITS
  idx |= bits >> (32 - _POISSON_BIN_BITS)
  x = packed.take(idx)
  ambiguous = np.flatnonzero(x >= 0x8000)
  if ambiguous.size:
    entry = x.ravel()[ambiguous]
    lo = (entry & 0x3FFF).astype(np.intp)
    level = levels.ravel()[ambiguous].astype(np.intp)
    u = bits.ravel()[ambiguous] * (1.0 / 2.0 ** 32)
    step = level * cdf.shape[1] + lo  # flat index of cdf[k, lo]
    value = lo + (cdf.ravel().take(step) <= u)
    multi = np.flatnonzero(entry & 0x4000)
    if multi.size:
      # One binary search in the rows laid end to end, row k shifted by +k (non-decreasing overall since
      # every row ends at exactly 1).
      pos = np.searchsorted(stacked, u[multi] + level[multi], side="right")
      value[multi] = pos - level[multi] * cdf.shape[1]
    x &= 0x3FFF
    x.ravel()[ambiguous] = value
  else:
    x &= 0x3FFF
  return x


def _level_count(levels: np.ndarray) -> float:
  """2^ceil(log2(number of distinct 8-bit levels)) (Real-ESRGAN's Poisson 'vals')."""
  histogram = cv2.calcHist([levels.reshape(-1, 1)], [0], None, [256], [0, 256])  # exact counts, ~3x bincount
  distinct = int(np.count_nonzero(histogram))
  return float(2 ** math.ceil(math.log2(max(distinct, 1))))


def poisson_noise(rng, img: np.ndarray, scale: float, gray: bool) -> np.ndarray:
  """Poisson noise field for img (H, W, 3) float32 BGR; the noise of the 8-bit quantised image, scaled."""
  src = cv2.transform(img, _GRAY_BGR[None])[..., None] if gray else img
  levels = to_uint8(src)
  vals = _level_count(levels)
  counts = poisson_sample_levels(rng, levels, vals)
  noise = np.multiply(counts, np.float32(scale / vals), dtype=np.float32)
  noise -= np.multiply(levels, np.float32(scale / 255), dtype=np.float32)
  return noise


def jpeg(img: np.ndarray, quality: float, codec: str = "libjpeg") -> np.ndarray:
  """JPEG round trip of a float32 BGR image in [0, 1] with `codec` (see cassr_jax.data.jpeg)."""
  return jpeg_codecs.jpeg_round_trip(img, quality, codec)


def usm_sharpen(img: np.ndarray, weight: float, radius: int, threshold: float) -> np.ndarray:
  """Unsharp masking with a soft threshold mask (Real-ESRGAN's USM, sigma from the radius).

  soft * clip(img + weight * residual) + (1 - soft) * img with residual = img - blur(img), computed as
  img + soft * (sharp - img) with sharp = (1 + weight) img - weight blur(img), reusing buffers (each pass
  over a 512x512 crop costs about as much as a fresh allocation's page faults).
  """
  blur = cv2.GaussianBlur(img, (radius, radius), 0)
  mask = cv2.absdiff(img, blur)
  cv2.threshold(mask, np.float32(threshold / 255), 1.0, cv2.THRESH_BINARY, dst=mask)
  sharp = cv2.addWeighted(img, 1.0 + weight, blur, -weight, 0.0, dst=blur)
  np.clip(sharp, 0, 1, out=sharp)
  soft = _keep_channels(cv2.GaussianBlur(_keep_channels(mask, img), (radius, radius), 0), img)
  sharp -= img
  sharp *= soft
  sharp += img
  return sharp


# --------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------

def example_seed(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
  """The SeedSequence of one training example; the only source of its randomness."""
  for name, v in (("seed", seed), ("epoch", epoch), ("index", index)):
    if int(v) < 0:
      raise ValueError(f"example_seed: {name}={v} must be >= 0")
  return np.random.SeedSequence([int(seed), int(epoch), int(index)])


def child_rng(seq: np.random.SeedSequence, key: int) -> np.random.Generator:
  """Independent stream number `key` of seq (stable: does not depend on how often spawn was called)."""
  child = np.random.SeedSequence(seq.entropy, spawn_key=tuple(seq.spawn_key) + (int(key),))
  return np.random.Generator(np.random.PCG64(child))


class _Timer:
  def __init__(self, timings):
    self.timings = timings
    self.t = time.thread_time()

  def __call__(self, name):
    if self.timings is not None:
      now = time.thread_time()
      self.timings[name] = self.timings.get(name, 0.0) + now - self.t
      self.t = now


def _noise(img, p: StageParams, rng):
  if p.noise == "gaussian":
    noise = gaussian_noise(rng, img.shape, p.noise_sigma, p.gray_noise)
  else:
    noise = poisson_noise(rng, img, p.poisson_scale, p.gray_noise)
  if noise.shape != img.shape:  # a gray (H, W, 1) field, the same on every channel
    noise = cv2.merge([noise] * img.shape[2])  # (faster than numpy's broadcasting add)
  noise += img  # the field is ours: add in place
  return np.clip(noise, 0, 1, out=noise)


def degrade_with_params(hr: np.ndarray, config, params: DegradationParams, seq: np.random.SeedSequence,
                        timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
  """Applies `params` to hr (H, W, 3) uint8 RGB; noise fields are drawn from streams 1 and 2 of `seq`.

  Returns {'hr': uint8 RGB (the target: USM-sharpened if usm_target), 'lr': uint8 RGB of size
  (H/scale, W/scale)}.
  """
  s = settings(config)
  hr = np.asarray(hr)
  if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
    raise ValueError(f"degrade: expected an (H, W, 3) uint8 RGB image, got {hr.dtype} {hr.shape}")
  h, w = hr.shape[:2]
  if h % s.scale or w % s.scale:
    raise ValueError(f"degrade: HR size {h}x{w} is not a multiple of scale {s.scale}")
  tick = _Timer(timings)
  img = np.multiply(cv2.cvtColor(hr, cv2.COLOR_RGB2BGR), np.float32(1 / 255), dtype=np.float32)
  tick("to_float")
  sharp = None
  if s.usm_sharpen or s.usm_target:
    sharp = usm_sharpen(img, s.usm_weight, s.usm_radius, s.usm_threshold)
    tick("usm")
  target = sharp if s.usm_target else None
  if s.usm_sharpen:
    img = sharp  # Real-ESRGAN degrades the sharpened HR
  noise1, noise2 = child_rng(seq, 1), child_rng(seq, 2)
  lh, lw = h // s.scale, w // s.scale

  # Stage 1.
  p = params.stage1
  out = filter2d(img, build_kernel(p.kernel)) if p.blur else img
  tick("blur1")
  out = resize(out, max(1, int(h * p.resize_scale)), max(1, int(w * p.resize_scale)), p.resize_mode)
  tick("resize1")
  out = _noise(out, p, noise1)
  tick("noise1")
  out = jpeg(out, p.jpeg_quality, s.jpeg_codec)
  tick("jpeg1")

  # Stage 2 (its JPEG quality is used by the final step even when the stage is skipped).
  p = params.stage2
  if params.second_stage:
    if p.blur:
      out = filter2d(out, build_kernel(p.kernel))
    tick("blur2")
    out = resize(out, max(1, int(h / s.scale * p.resize_scale)), max(1, int(w / s.scale * p.resize_scale)),
                 p.resize_mode)
    tick("resize2")
    out = _noise(out, p, noise2)
    tick("noise2")
  sinc = build_kernel(params.final_sinc) if params.final_sinc.kind != "pulse" else None
  if params.final_resize_first:
    out = resize(out, lh, lw, params.final_resize_mode)
    out = filter2d(out, sinc) if sinc is not None else out
    tick("final_resize_sinc")
    out = jpeg(out, p.jpeg_quality, s.jpeg_codec)
    tick("jpeg2")
  else:
    out = jpeg(out, p.jpeg_quality, s.jpeg_codec)
    tick("jpeg2")
    out = resize(out, lh, lw, params.final_resize_mode)
    out = filter2d(out, sinc) if sinc is not None else out
    tick("final_resize_sinc")
  lr = cv2.cvtColor(to_uint8(out), cv2.COLOR_BGR2RGB)
  # The training target: the plain HR, or (usm_target) the sharpened HR rounded to 8 bits.
  hr_out = cv2.cvtColor(to_uint8(target), cv2.COLOR_BGR2RGB) if target is not None else hr
  tick("round")
  return {"hr": hr_out, "lr": lr}


def degrade(hr: np.ndarray, config, seq: np.random.SeedSequence | int,
            timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
  """Degrades hr (H, W, 3) uint8 RGB with the randomness of `seq` (see example_seed)."""
  if not isinstance(seq, np.random.SeedSequence):
    seq = np.random.SeedSequence(int(seq))
  s = settings(config)
  params = sample_params(s, child_rng(seq, 0))
  return degrade_with_params(hr, s, params, seq, timings)
