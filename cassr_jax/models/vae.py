"""SD AutoencoderKL (the latent VAE) in Flax NNX, with diffusers' module names and NHWC layout.

Images are (B, H, W, 3) in [-1, 1]; latents are (B, H/f, W/f, latent_channels) with f = 2**(levels-1)
(8 for SD-1.5). `encode` gives the posterior (a diagonal Gaussian), `decode` maps unscaled latents back to
images; the diffusion model works on scaled latents, (z - shift_factor) * scaling_factor.

Supported diffusers config options: DownEncoderBlock2D / UpDecoderBlock2D blocks, any widths, layers per block,
latent channels, GroupNorm groups, scaling and shift factors, quant_conv / post_quant_conv on or off, mid-block
attention on or off. Everything else (other block types or activations, latents_mean/std) raises ValueError.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from cassr_jax.models import ModelKind
from cassr_jax.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from cassr_jax.nn import layers
from cassr_jax.nn.layers import FP32, Policy

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
# The VAE's GroupNorms (resnets, mid attention, output norms) all use this eps in diffusers.
VAE_NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"VAEConfig: block_out_channels {bad} are not divisible by "
                       f"norm_num_groups={self.norm_num_groups}")

  @property
  def downscale(self) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def sd15(cls) -> "VAEConfig":
    return cls()

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
    """From a diffusers vae/config.json dict; unsupported options raise ValueError naming them."""
    fields = {f.name for f in dataclasses.fields(cls)}
    # Keys that only steer diffusers' runtime (tiling tile size, fp32 upcast hint) and change no weights.
    runtime_only = {"sample_size", "force_upcast"}
    known = fields | runtime_only | {"down_block_types", "up_block_types", "act_fn", "latents_mean",
                                     "latents_std"}
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    channels = tuple(cfg.get("block_out_channels", (64,)))
    down = tuple(cfg.get("down_block_types", (DOWN_BLOCK,)))
    up = tuple(cfg.get("up_block_types", (UP_BLOCK,)))
    bad = [f"unknown key {k!r}" for k in unknown]
    bad += [f"down block {t!r}" for t in sorted(set(down) - {DOWN_BLOCK})]
    bad += [f"up block {t!r}" for t in sorted(set(up) - {UP_BLOCK})]
    if len(down) != len(channels) or len(up) != len(channels):
      bad.append(f"{len(down)} down / {len(up)} up block types for {len(channels)} block_out_channels")
    if cfg.get("act_fn", "silu") != "silu":
      bad.append(f"act_fn={cfg['act_fn']!r}")
    for key in ("latents_mean", "latents_std"):
      if cfg.get(key) is not None:
        bad.append(f"{key} (per-channel latent statistics)")
    if bad:
      raise ValueError("unsupported AutoencoderKL config: " + ", ".join(bad))
    # diffusers' own defaults where the file omits a key (its __init__ defaults, not SD-1.5's).
    shift = cfg.get("shift_factor")
    return cls(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        block_out_channels=channels, layers_per_block=cfg.get("layers_per_block", 1),
        latent_channels=cfg.get("latent_channels", 4), norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=None if shift is None else float(shift),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)))


@struct.dataclass
class DiagonalGaussian:
  """The VAE posterior N(mean, exp(logvar)); a pytree, so it can leave a jitted function."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits the encoder's 2*latent channels into mean and logvar; logvar clipped as in diffusers."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
    return self.mean + self.std * noise

  def mode(self) -> jax.Array:
    return self.mean


class VAEAttention(Attention):
  """The mid-block self-attention: GroupNorm, one head over all channels, output projection, residual add."""

  def __init__(self, channels: int, *, groups: int, attention: str, policy: Policy, rngs: nnx.Rngs):
    # Softmax runs in fp32 on every attention path, which is what diffusers' upcast_softmax asks for here.
    super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True, attention=attention, policy=policy,
                     rngs=rngs)
    self.group_norm = layers.group_norm(channels, groups, VAE_NORM_EPS, policy=policy, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    y = super().__call__(self.group_norm(x).reshape(b, h * w, c))
    return x + y.reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """UNetMidBlock2D without timestep: resnet, (attention), resnet."""

  def __init__(self, cfg: VAEConfig, *, attention: str, policy: Policy, rngs: nnx.Rngs):
    ch = cfg.block_out_channels[-1]
    kw = dict(policy=policy, rngs=rngs)
    res_kw = dict(temb_ch=None, groups=cfg.norm_num_groups, eps=VAE_NORM_EPS, **kw)
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, **res_kw), ResnetBlock2D(ch, ch, **res_kw)])
    self.attentions = (nnx.List([VAEAttention(ch, groups=cfg.norm_num_groups, attention=attention, **kw)])
                       if cfg.mid_block_add_attention else None)

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
  """DownEncoderBlock2D: resnets, then a stride-2 conv with the asymmetric (0, 1) pad unless last."""

  def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, groups: int, downsample: bool,
               policy: Policy, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch=None, groups=groups, eps=VAE_NORM_EPS, **kw)
        for j in range(num_layers)])
    self.downsamplers = nnx.List([Downsample2D(out_ch, padding=0, **kw)]) if downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock(nnx.Module):
  """UpDecoderBlock2D: resnets, then nearest x2 and a conv unless last."""

  def __init__(self, in_ch: int, out_ch: int, *, num_layers: int, groups: int, upsample: bool,
               policy: Policy, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch=None, groups=groups, eps=VAE_NORM_EPS, **kw)
        for j in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class Encoder(nnx.Module):
  """Image -> 2*latent_channels moments (mean, logvar) at 1/downscale resolution."""

  def __init__(self, cfg: VAEConfig, *, attention: str, policy: Policy, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    ch = cfg.block_out_channels
    self.conv_in = layers.conv(cfg.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock(ch[max(i - 1, 0)], ch[i], num_layers=cfg.layers_per_block, groups=cfg.norm_num_groups,
                         downsample=i < len(ch) - 1, **kw) for i in range(len(ch))])
    self.mid_block = MidBlock(cfg, attention=attention, **kw)
    self.conv_norm_out = layers.group_norm(ch[-1], cfg.norm_num_groups, VAE_NORM_EPS, **kw)
    self.conv_out = layers.conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent -> image; up blocks have layers_per_block + 1 resnets."""

  def __init__(self, cfg: VAEConfig, *, attention: str, policy: Policy, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    rev = tuple(reversed(cfg.block_out_channels))
    self.conv_in = layers.conv(cfg.latent_channels, rev[0], 3, **kw)
    self.mid_block = MidBlock(cfg, attention=attention, **kw)
    self.up_blocks = nnx.List([
        UpDecoderBlock(rev[max(i - 1, 0)], rev[i], num_layers=cfg.layers_per_block + 1,
                       groups=cfg.norm_num_groups, upsample=i < len(rev) - 1, **kw) for i in range(len(rev))])
    self.conv_norm_out = layers.group_norm(rev[-1], cfg.norm_num_groups, VAE_NORM_EPS, **kw)
    self.conv_out = layers.conv(rev[-1], cfg.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """SD VAE. attention: implementation of the mid-block attention (see cassr_jax.nn.attention)."""

  def __init__(self, config: VAEConfig, *, policy: Policy = FP32, attention: str = "auto", rngs: nnx.Rngs):
    cfg = self.config = config
    kw = dict(policy=policy, rngs=rngs)
    self.encoder = Encoder(cfg, attention=attention, **kw)
    self.decoder = Decoder(cfg, attention=attention, **kw)
    latent2 = 2 * cfg.latent_channels
    self.quant_conv = layers.conv(latent2, latent2, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = (layers.conv(cfg.latent_channels, cfg.latent_channels, 1, **kw)
                            if cfg.use_post_quant_conv else None)
    self.dtype = policy.dtype

  def _check_spatial(self, x, what: str, channels: int, multiple: int):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"AutoencoderKL.{what}: expected NHWC input with {channels} channels, got shape "
                       f"{tuple(x.shape)}")
    if x.shape[1] % multiple or x.shape[2] % multiple:
      raise ValueError(f"AutoencoderKL.{what}: height and width must be multiples of {multiple}, got "
                       f"{tuple(x.shape[1:3])}")

  def encode(self, images) -> DiagonalGaussian:
    """(B, H, W, C) images in [-1, 1] -> posterior over unscaled latents."""
    self._check_spatial(images, "encode", self.config.in_channels, self.config.downscale)
    moments = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, latents):
    """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
    self._check_spatial(latents, "decode", self.config.latent_channels, 1)
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def scale_latents(self, z):
    """VAE latents -> the diffusion model's latent space."""
    shift = self.config.shift_factor or 0.0
    return (z - shift) * self.config.scaling_factor

  def unscale_latents(self, z):
    shift = self.config.shift_factor or 0.0
    return z / self.config.scaling_factor + shift

  def encode_latents(self, images, key: jax.Array | None = None):
    """Images -> scaled latents: a posterior sample if `key` is given, else its mean."""
    posterior = self.encode(images)
    return self.scale_latents(posterior.mode() if key is None else posterior.sample(key))

  def decode_latents(self, scaled_latents):
    return self.decode(self.unscale_latents(scaled_latents))

  def __call__(self, images, key: jax.Array | None = None):
    """Reconstruction (diffusers' forward): decode(sample or mode of encode(images))."""
    posterior = self.encode(images)
    return self.decode(posterior.mode() if key is None else posterior.sample(key))


def build(config: VAEConfig, *, policy: Policy = FP32, rngs: nnx.Rngs, attention: str = "auto"):
  return AutoencoderKL(config, policy=policy, attention=attention, rngs=rngs)


MODEL_KIND = ModelKind(VAEConfig, build)
