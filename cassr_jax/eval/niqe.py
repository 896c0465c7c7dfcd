"""NIQE (Mittal et al., "Making a completely blind image quality analyzer") as BasicSR computes it.

BasicSR's calculate_niqe: luma Y (BT.601, 0-255) rounded, crop_border, cropped to whole 96x96 blocks; at two
scales (the second a MATLAB-style antialiased bicubic half-size resize) each pixel is normalised by a 7x7
Gaussian local mean / deviation (edge-replicated borders), and each block gives 18 features: the AGGD fit
(alpha on a 0.001 grid from 0.2 to 10, left/right scales) of the block and of its products with the block
circularly shifted by (0,1), (1,0), (1,1), (1,-1). The features of all blocks are fitted with a Gaussian and
NIQE is sqrt((mu_p - mu)^T pinv((S_p + S) / 2) (mu_p - mu)) against the pristine model (mu_p, S_p).

The per-block features run in JAX (jitted, batched over images of one size); the 36-dimensional fit and the
pseudo-inverse run per image on the host in float64 (BasicSR's nanmean / nan-row-dropping covariance).
Parameters: niqe_pris_params.npz (the official MATLAB model as BasicSR ships it), found in the weights
directory (argument / $CASSR_METRIC_WEIGHTS) or the copy packaged in cassr_jax/assets.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from cassr_jax.eval.pixel import rgb_to_y

WEIGHTS_ENV = "CASSR_METRIC_WEIGHTS"
PARAMS_NAME = "niqe_pris_params.npz"
BLOCK = 96
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def locate_params(weights_dir: str | None = None) -> str:
  looked = []
  directory = weights_dir or os.environ.get(WEIGHTS_ENV)
  for d in ([directory] if directory else []) + [_ASSETS]:
    path = os.path.join(d, PARAMS_NAME)
    if os.path.isfile(path):
      return path
    looked.append(path)
  raise FileNotFoundError(f"NIQE pristine model {PARAMS_NAME} not found; looked in: {', '.join(looked)}")


@functools.lru_cache(maxsize=8)
def load_params(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mu_pris (36,), cov_pris (36, 36), gaussian_window (7, 7)) float64."""
  try:
    with np.load(path) as f:
      mu, cov, window = f["mu_pris_param"], f["cov_pris_param"], f["gaussian_window"]
  except (OSError, KeyError, ValueError) as e:
    raise ValueError(f"{path}: not a NIQE parameter file (needs mu_pris_param, cov_pris_param, "
                     f"gaussian_window): {e}") from e
  return np.asarray(mu, np.float64).reshape(-1), np.asarray(cov, np.float64), np.asarray(window, np.float64)


@functools.lru_cache(maxsize=1)
def _aggd_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The alpha grid, r(alpha) = G(2/a)^2 / (G(1/a) G(3/a)), sqrt(G(1/a) / G(3/a)) and G(2/a) / G(1/a)."""
  gamma_fn = np.vectorize(math.gamma)  # float64, no scipy needed at run time
  alpha = np.arange(0.2, 10.001, 0.001)
  r = gamma_fn(2 / alpha) ** 2 / (gamma_fn(1 / alpha) * gamma_fn(3 / alpha))
  return alpha, r, np.sqrt(gamma_fn(1 / alpha) / gamma_fn(3 / alpha)), gamma_fn(2 / alpha) / gamma_fn(1 / alpha)


def aggd_fit(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """AGGD (alpha, beta_left, beta_right, alpha's grid index) of each block, x (..., n) flattened blocks
  (BasicSR's estimate_aggd_param; a block without negative or positive values gives nan scales, alpha 0.2)."""
  alpha, r, ratio13, _ = _aggd_tables()
  neg, pos = x < 0, x > 0
  left_std = jnp.sqrt(jnp.sum(jnp.where(neg, x * x, 0.0), -1) / jnp.sum(neg, -1))
  right_std = jnp.sqrt(jnp.sum(jnp.where(pos, x * x, 0.0), -1) / jnp.sum(pos, -1))
  gammahat = left_std / right_std
  rhat = jnp.mean(jnp.abs(x), -1) ** 2 / jnp.mean(x * x, -1)
  rhatnorm = rhat * (gammahat ** 3 + 1) * (gammahat + 1) / (gammahat ** 2 + 1) ** 2
  # r(alpha) increases with alpha, so the grid point nearest rhatnorm is one of the two around it.
  r_table = jnp.asarray(r, jnp.float32)
  hi = jnp.clip(jnp.searchsorted(r_table, rhatnorm), 1, len(r) - 1)
  lo = hi - 1
  idx = jnp.where(jnp.abs(r_table[lo] - rhatnorm) <= jnp.abs(r_table[hi] - rhatnorm), lo, hi)
  idx = jnp.where(jnp.isnan(rhatnorm), 0, idx)  # np.argmin over all-nan picks the first entry
  scale = jnp.asarray(ratio13, jnp.float32)[idx]
  return jnp.asarray(alpha, jnp.float32)[idx], left_std * scale, right_std * scale, idx


def block_features(blocks: jax.Array) -> jax.Array:
  """(..., b, b) normalised blocks -> (..., 18) NIQE features."""
  _, _, _, ratio21 = _aggd_tables()
  flat = blocks.reshape(blocks.shape[:-2] + (-1,))
  alpha, bl, br, _ = aggd_fit(flat)
  feats = [alpha, (bl + br) / 2]
  for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
    shifted = jnp.roll(blocks, shift, axis=(-2, -1))
    alpha, bl, br, idx = aggd_fit((blocks * shifted).reshape(flat.shape))
    feats += [alpha, (br - bl) * jnp.asarray(ratio21, jnp.float32)[idx], bl, br]
  return jnp.stack(feats, -1)


@functools.lru_cache(maxsize=32)
def matlab_half_taps(in_size: int) -> tuple[np.ndarray, np.ndarray]:
  """MATLAB imresize(x, 0.5) bicubic with antialiasing along one axis: (out, 10) source indices
  (symmetric borders) and weights."""
  out_size = -(-in_size // 2)
  scale, width = 0.5, 4.0 / 0.5
  u = np.arange(1, out_size + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)
  left = np.floor(u - width / 2)
  taps = int(np.ceil(width)) + 2
  idx = left[:, None] + np.arange(taps)[None, :]  # 1-based
  d = np.abs(u[:, None] - idx) * scale
  cubic = np.where(d <= 1, 1.5 * d ** 3 - 2.5 * d ** 2 + 1,
                   np.where(d <= 2, -0.5 * d ** 3 + 2.5 * d ** 2 - 4 * d + 2, 0.0))
  w = scale * cubic
  w = w / w.sum(1, keepdims=True)
  i0 = idx.astype(np.int64) - 1
  i0 = np.where(i0 < 0, -i0 - 1, i0)
  i0 = np.where(i0 >= in_size, 2 * in_size - 1 - i0, i0)
  return i0.astype(np.int32), w


def _half_axis(x: jax.Array, axis: int) -> jax.Array:
  idx, w = matlab_half_taps(x.shape[axis])
  g = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=axis)
  g = g.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])
  wj = jnp.asarray(w, x.dtype).reshape(idx.shape + (1,) * (x.ndim - axis - 1))
  return jnp.sum(g * wj, axis=axis + 1)


def imresize_half(x: jax.Array) -> jax.Array:
  """(B, H, W) -> (B, ceil(H/2), ceil(W/2)), MATLAB imresize(x, 0.5) (rows first, as BasicSR)."""
  return _half_axis(_half_axis(x, 1), 2)


def _local_normalise(y: jax.Array, window: np.ndarray) -> jax.Array:
  """(y - mu) / (sigma + 1) with mu, sigma from the 7x7 window, edge-replicated borders."""
  k = window.shape[0]
  w = jnp.asarray(window[::-1, ::-1].copy(), jnp.float32)[:, :, None, None]  # convolution, not correlation
  # Variance is shift invariant; removing the image mean first loses less to float32 cancellation.
  c = y - jnp.mean(y, axis=(1, 2), keepdims=True)

  def filt(v):
    v = jnp.pad(v, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)), mode="edge")[..., None]
    out = jax.lax.conv_general_dilated(v, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    return out[..., 0]

  mu = filt(c)
  sigma = jnp.sqrt(jnp.abs(filt(c * c) - mu * mu))
  return (c - mu) / (sigma + 1)


def _blocks(x: jax.Array, size: int) -> jax.Array:
  b, h, w = x.shape
  return x.reshape(b, h // size, size, w // size, size).transpose(0, 1, 3, 2, 4).reshape(b, -1, size, size)


@functools.partial(jax.jit, static_argnames=("window_key",))
def _features_jit(y: jax.Array, window_key: tuple) -> jax.Array:
  window = np.asarray(window_key, np.float64).reshape(7, 7)
  feats = []
  for scale in (1, 2):
    feats.append(block_features(_blocks(_local_normalise(y, window), BLOCK // scale)))
    if scale == 1:
      y = imresize_half(y / 255.0) * 255.0
  return jnp.concatenate(feats, -1)


def niqe_features(y255: jax.Array, window: np.ndarray) -> jax.Array:
  """(B, H, W) rounded luma on 0-255 -> (B, blocks, 36) features (cropped to whole 96x96 blocks)."""
  h, w = y255.shape[1] // BLOCK * BLOCK, y255.shape[2] // BLOCK * BLOCK
  if h == 0 or w == 0:
    raise ValueError(f"NIQE needs images of at least {BLOCK}x{BLOCK} (after crop_border), got {y255.shape[1:]}")
  y = jnp.asarray(y255, jnp.float32)[:, :h, :w]
  return _features_jit(y, tuple(np.asarray(window, np.float64).reshape(-1).tolist()))


def niqe_from_features(feats: np.ndarray, mu_pris: np.ndarray, cov_pris: np.ndarray) -> float:
  """The MVG distance of one image's (blocks, 36) features to the pristine model (host, float64)."""
  feats = np.asarray(feats, np.float64)
  mu = np.nanmean(feats, axis=0)
  cov = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)
  d = mu_pris - mu
  return float(np.sqrt(d @ np.linalg.pinv((cov_pris + cov) / 2) @ d))


def niqe_y(y255, weights_dir: str | None = None) -> np.ndarray:
  """NIQE (B,) of (B, H, W) luma images on 0-255 (already rounded and cropped as wanted)."""
  mu, cov, window = load_params(locate_params(weights_dir))
  feats = np.asarray(niqe_features(jnp.asarray(y255), window))
  return np.array([niqe_from_features(f, mu, cov) for f in feats], np.float64)


class NIQE:
  """The NIQE metric object of the metric protocol (no reference; lower is better)."""
  name = "niqe"
  kind = "no_reference"
  higher_is_better = False
  backend = "jax"

  def __init__(self, crop_border: int = 0, weights_dir: str | None = None):
    self.crop_border = crop_border
    self.weights_dir = weights_dir

  def __call__(self, pred: jax.Array, gt=None) -> jax.Array:
    """(B, H, W, 3) RGB [0, 1] -> (B,) NIQE; gt is ignored."""
    del gt
    if pred.ndim != 4 or pred.shape[-1] != 3:
      raise ValueError(f"expected (B, H, W, 3) NHWC images, got shape {pred.shape}")
    y = jnp.round(rgb_to_y(jnp.asarray(pred, jnp.float32)))
    c = self.crop_border
    if c:
      y = y[:, c:-c, c:-c]
    return jnp.asarray(niqe_y(y, self.weights_dir), jnp.float32)


NIQE_METRIC = NIQE()
