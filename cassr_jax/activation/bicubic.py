"""The "LR-Image" activation of the paper's ablation: the bicubic-upsampled LR itself (no parameters)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cassr_jax.activation import check_lr
from cassr_jax.image_ops import upscale_bicubic


class BicubicActivation:
  """LR (B, h, w, 3) -> clip(bicubic x scale, 0, 1); torch F.interpolate bicubic semantics (image_ops)."""
  name = "bicubic"
  jittable = True

  def __init__(self, scale: int = 4):
    if int(scale) != scale or scale < 1:
      raise ValueError(f"activation 'bicubic': scale must be a positive integer, got {scale}")
    self.scale = int(scale)

  def __call__(self, lr: jax.Array) -> jax.Array:
    lr = check_lr(lr, self.name)
    return jnp.clip(upscale_bicubic(lr, self.scale), 0.0, 1.0)

  def pure(self):
    return (lambda state, lr: self(lr)), None

