"""Stage-1 option "ControlNet": SD U-Net + a (converted diffusers) ControlNet conditioned on the LR image.

eps = unet(x_t, t, text, residuals = controlnet(x_t, t, text, lr_up)), lr_up being the LR image bicubic-upsampled
to the output size, in [0, 1] (diffusers' SD ControlNets, e.g. a tile ControlNet, take [0, 1] hints). This is
CasSR's residual path without the reference branch; the forward pass is the existing ControlNetModel and the
U-Net's ControlNet-residual input, not a copy of them. The U-Net is frozen; training (if any) updates the
ControlNet only (trained_parts).
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from cassr_jax.models import ModelKind
from cassr_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_from_unet
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from cassr_jax.nn.layers import FP32, Policy


@dataclasses.dataclass(frozen=True)
class ControlNetSRConfig:
  unet: UNetConfig = UNetConfig()
  controlnet: ControlNetConfig = ControlNetConfig()
  conditioning_scale: float = 1.0  # diffusers' controlnet_conditioning_scale

  def __post_init__(self):
    down = (self.unet.block_out_channels, self.unet.layers_per_block)
    cn = (self.controlnet.block_out_channels, self.controlnet.layers_per_block)
    if down != cn:
      raise ValueError(f"ControlNetSR config: the ControlNet's down path must match the U-Net's (U-Net {down}, "
                       f"ControlNet {cn})")

  @classmethod
  def from_unet(cls, unet: UNetConfig, **overrides) -> "ControlNetSRConfig":
    return cls(unet=unet, controlnet=ControlNetConfig.from_unet(unet), **overrides)



class ControlNetSR(nnx.Module):
  """Inputs: latents (B, h, w, 4), timesteps, text context, lr_up (B, 8h, 8w, 3) in [0, 1]; returns eps (NHWC)."""

  def __init__(self, config: ControlNetSRConfig, *, policy: Policy = FP32, attention: str = "auto",
               rngs: nnx.Rngs, unet: UNet2DConditionModel | None = None,
               controlnet: ControlNetModel | None = None):
    """unet / controlnet: existing (converted) models to hold as they are (not copied)."""
    self.config = config
    for name, given, expected in (("U-Net", unet, config.unet), ("ControlNet", controlnet, config.controlnet)):
      if given is not None and given.config != expected:
        raise ValueError(f"ControlNetSR: the given {name}'s config differs from the model config")
    self.unet = unet if unet is not None else UNet2DConditionModel(
        config.unet, policy=policy, attention=attention, rngs=rngs)
    self.controlnet = controlnet if controlnet is not None else ControlNetModel(
        config.controlnet, policy=policy, attention=attention, rngs=rngs)

  def trained_parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ControlNet trains; the SD U-Net stays frozen (cassr_jax.models.trainable_filter)."""
    return ("controlnet",), ()

  def __call__(self, sample, timesteps, context, lr_up, *, conditioning_scale: float | None = None):
    b, h, w, _ = sample.shape
    expected = (b, 8 * h, 8 * w, self.config.controlnet.conditioning_channels)
    if tuple(lr_up.shape) != expected:
      raise ValueError(f"ControlNetSR: expected lr_up of shape {expected} (8x the latent size), "
                       f"got {tuple(lr_up.shape)}")
    scale = self.config.conditioning_scale if conditioning_scale is None else conditioning_scale
    down, mid = self.controlnet(sample, timesteps, context, lr_up, conditioning_scale=scale)
    return self.unet(sample, timesteps, context, down_residuals=down, mid_residual=mid)


def controlnet_sr_from_pretrained(unet: UNet2DConditionModel, controlnet: ControlNetModel | None = None, *,
                                  conditioning_scale: float = 1.0, policy: Policy = FP32, attention: str = "auto",
                                  seed: int = 0) -> ControlNetSR:
  """Wraps a converted SD U-Net and ControlNet (held, not copied). Without a ControlNet, one is made by
  ControlNet's recipe (copy of the U-Net encoder, zero convolutions), so the model starts as plain SD."""
  if controlnet is None:
    controlnet = controlnet_from_unet(unet, policy=policy, attention=attention, seed=seed)
  config = ControlNetSRConfig(unet=unet.config, controlnet=controlnet.config,
                              conditioning_scale=conditioning_scale)
  return ControlNetSR(config, policy=policy, attention=attention, rngs=nnx.Rngs(seed), unet=unet,
                      controlnet=controlnet)


def build(config: ControlNetSRConfig, *, policy: Policy = FP32, rngs: nnx.Rngs, attention: str = "auto"):
  return ControlNetSR(config, policy=policy, attention=attention, rngs=rngs)


MODEL_KIND = ModelKind(ControlNetSRConfig, build)
