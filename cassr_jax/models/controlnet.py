"""SD ControlNet (diffusers' ControlNetModel) in Flax NNX: the U-Net's down path and mid block, a pixel-space
hint encoder, and zero 1x1 convolutions per skip connection and for the mid block.

`features` returns the hint-conditioned down-path activations BEFORE the zero convolutions (CasSR's
reference/LR attention reads these); `residuals` applies the zero convolutions (what ControlNet adds to the
U-Net's skips).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax.models import ModelKind
from cassr_jax.models.blocks import TimestepEmbedding
from cassr_jax.models.unet import DownBlock, MidBlock, UNet2DConditionModel, UNetConfig, down_path, embed_timesteps
from cassr_jax.nn import layers
from cassr_jax.nn.layers import FP32, Policy

_CONTROLNET_ONLY_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels",
                         "controlnet_conditioning_channel_order", "global_pool_conditions")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)

  @classmethod
  def from_diffusers(cls, cfg: dict[str, Any]) -> "ControlNetConfig":
    bad = []
    if cfg.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
      bad.append(f"controlnet_conditioning_channel_order={cfg['controlnet_conditioning_channel_order']!r}")
    if cfg.get("global_pool_conditions", False):
      bad.append("global_pool_conditions=True")
    if bad:
      raise ValueError("unsupported ControlNetModel config: " + ", ".join(bad))
    base = UNetConfig.from_diffusers({k: v for k, v in cfg.items() if k not in _CONTROLNET_ONLY_KEYS})
    return cls(**dataclasses.asdict(base), conditioning_channels=cfg.get("conditioning_channels", 3),
               conditioning_embedding_out_channels=tuple(
                   cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)))

  @classmethod
  def from_unet(cls, unet: UNetConfig, **overrides) -> "ControlNetConfig":
    return cls(**dataclasses.asdict(unet), **overrides)


class ControlNetConditioningEmbedding(nnx.Module):
  """Hint encoder: conv_in, then pairs (3x3 conv, 3x3 stride-2 conv) with SiLU, then conv_out to the
  U-Net width; downsamples by 2**(len(channels)-1) (8 for SD: image size -> latent size)."""

  def __init__(self, in_ch: int, out_ch: int, channels: tuple[int, ...], *, zero_out: bool = True,
               policy: Policy = FP32, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    self.conv_in = layers.conv(in_ch, channels[0], 3, **kw)
    blocks = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
      blocks.append(layers.conv(c_in, c_in, 3, **kw))
      blocks.append(layers.conv(c_in, c_out, 3, stride=2, **kw))
    self.blocks = nnx.List(blocks)
    self.conv_out = layers.conv(channels[-1], out_ch, 3, zero_init=zero_out, **kw)

  def __call__(self, hint):
    x = nnx.silu(self.conv_in(hint))
    for block in self.blocks:
      x = nnx.silu(block(x))
    return self.conv_out(x)


class ControlNetModel(nnx.Module):
  """Inputs: latents (B, h, w, 4), timesteps, text context, hint image (B, 8h, 8w, 3) in the model's
  expected range (diffusers' SD ControlNets take [0, 1])."""

  def __init__(self, config: ControlNetConfig, *, policy: Policy = FP32, attention: str = "auto",
               zero_hint_out: bool = True, remat: str = "none", rngs: nnx.Rngs):
    cfg = self.config = config
    kw = dict(policy=policy, rngs=rngs)
    ch = cfg.block_out_channels
    self.dtype = policy.dtype
    self.conv_in = layers.conv(cfg.in_channels, ch[0], 3, **kw)
    self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, **kw)
    self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
        cfg.conditioning_channels, ch[0], cfg.conditioning_embedding_out_channels, zero_out=zero_hint_out, **kw)
    self.down_blocks = nnx.List([
        DownBlock(cfg, i, ch[max(i - 1, 0)], attention=attention, remat=remat, **kw) for i in range(len(ch))])
    self.mid_block = MidBlock(cfg, attention=attention, remat=remat, **kw)
    skip_channels = [ch[0]]
    for i, c in enumerate(ch):
      skip_channels += [c] * cfg.layers_per_block + ([c] if i < len(ch) - 1 else [])
    self.skip_channels = tuple(skip_channels)
    self.controlnet_down_blocks = nnx.List([
        layers.conv(c, c, 1, zero_init=True, **kw) for c in skip_channels])
    self.controlnet_mid_block = layers.conv(ch[-1], ch[-1], 1, zero_init=True, **kw)

  def features(self, sample, timesteps, context, hint):
    """Down-path skip activations and the mid-block output, before the zero convolutions."""
    temb = embed_timesteps(self.time_embedding, self.config, timesteps, sample.shape[0], self.dtype)
    context = context.astype(self.dtype)
    x = self.conv_in(sample.astype(self.dtype)) + self.controlnet_cond_embedding(hint.astype(self.dtype))
    x, skips = down_path(self.down_blocks, x, temb, context)
    return skips, self.mid_block(x, temb, context)

  def residuals(self, skips, mid, scale: float = 1.0):
    down = [conv(s) * scale for conv, s in zip(self.controlnet_down_blocks, skips)]
    return down, self.controlnet_mid_block(mid) * scale

  def __call__(self, sample, timesteps, context, hint, *, conditioning_scale: float = 1.0):
    """Returns (down residuals, mid residual), as diffusers' ControlNetModel (guess_mode off)."""
    return self.residuals(*self.features(sample, timesteps, context, hint), conditioning_scale)


def controlnet_from_unet(unet: UNet2DConditionModel, *, policy: Policy = FP32, attention: str = "auto",
                         zero_hint_out: bool = True, seed: int = 0, remat: str = "none",
                         conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)):
  """ControlNet's own recipe: copy the U-Net's conv_in, time MLP, down path and mid block; zero convs zero.

  zero_hint_out=False gives the hint encoder's last conv a random init instead of zeros, so the hint
  reaches the features from the first step (CasSR reads those features directly).
  """
  config = ControlNetConfig.from_unet(
      unet.config, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
  net = ControlNetModel(config, policy=policy, attention=attention, zero_hint_out=zero_hint_out, remat=remat,
                        rngs=nnx.Rngs(seed))
  copy_unet_encoder(unet, net)
  return net


def copy_unet_encoder(unet: UNet2DConditionModel, net: ControlNetModel) -> None:
  """Copies the U-Net's conv_in, time MLP, down path and mid block into the ControlNet (in its dtype)."""
  for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
    target = getattr(net, name)
    dtypes = jax.tree.map(lambda a: a.dtype, nnx.state(target, nnx.Param))
    source = nnx.state(getattr(unet, name), nnx.Param)
    nnx.update(target, jax.tree.map(lambda a, d: jnp.asarray(a, d), source, dtypes))


def build(config: ControlNetConfig, *, policy: Policy = FP32, rngs: nnx.Rngs, attention: str = "auto",
          zero_hint_out: bool = True, remat: str = "none"):
  return ControlNetModel(config, policy=policy, attention=attention, zero_hint_out=zero_hint_out, remat=remat,
                         rngs=rngs)


MODEL_KIND = ModelKind(ControlNetConfig, build)
