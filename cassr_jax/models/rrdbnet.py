"""RRDBNet (ESRGAN / Real-ESRGAN generator) in Flax NNX, NHWC.

Attribute names mirror BasicSR's torch module (conv_first, body.N.rdbK.convJ, conv_body, conv_up1, conv_up2,
conv_hr, conv_last), so a BasicSR state dict loads with convert.strict.load_torch_state and no renaming.
Real-ESRGAN x4plus is the default config: 23 RRDBs, 64 features, growth 32, 16,697,987 parameters.
Scales 2 and 1 fold the input into channels with a pixel-unshuffle first (as BasicSR), so their inputs must be
divisible by 2 and 4 respectively; the x4 path takes any size.
Initialisation is the layers' default: this model is meant to run pretrained weights (BasicSR additionally
scales the body's random init by 0.1 for training from scratch; rescaling after construction would double
the cost of building the model under nnx.eval_shape, so it is left out).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax.models import ModelKind
from cassr_jax.nn.layers import FP32, Policy, conv

_SLOPE = 0.2       # LeakyReLU negative slope everywhere in the network
_RES_SCALE = 0.2   # residual scaling of every dense block and every RRDB


@dataclasses.dataclass(frozen=True)
class RRDBNetConfig:
  num_in_ch: int = 3
  num_out_ch: int = 3
  scale: int = 4
  num_feat: int = 64
  num_block: int = 23
  num_grow_ch: int = 32

  def __post_init__(self):
    if self.scale not in (1, 2, 4):
      raise ValueError(f"RRDBNetConfig.scale must be 1, 2 or 4, got {self.scale}")
    for name in ("num_in_ch", "num_out_ch", "num_feat", "num_block", "num_grow_ch"):
      if getattr(self, name) < 1:
        raise ValueError(f"RRDBNetConfig.{name} must be positive, got {getattr(self, name)}")

  @property
  def unshuffle(self) -> int:
    """Pixel-unshuffle factor applied to the input (4 // scale)."""
    return 4 // self.scale


def _lrelu(x: jax.Array) -> jax.Array:
  return jax.nn.leaky_relu(x, _SLOPE)


class ResidualDenseBlock(nnx.Module):
  """Five 3x3 convs, each seeing the block input and all earlier outputs (dense connections)."""

  def __init__(self, num_feat: int, num_grow_ch: int, *, policy: Policy, rngs: nnx.Rngs, zero: bool = False):
    g = num_grow_ch
    kw = dict(policy=policy, rngs=rngs, zero_init=zero)
    self.conv1 = conv(num_feat, g, 3, **kw)
    self.conv2 = conv(num_feat + g, g, 3, **kw)
    self.conv3 = conv(num_feat + 2 * g, g, 3, **kw)
    self.conv4 = conv(num_feat + 3 * g, g, 3, **kw)
    self.conv5 = conv(num_feat + 4 * g, num_feat, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x1 = _lrelu(self.conv1(x))
    x2 = _lrelu(self.conv2(jnp.concatenate([x, x1], axis=-1)))
    x3 = _lrelu(self.conv3(jnp.concatenate([x, x1, x2], axis=-1)))
    x4 = _lrelu(self.conv4(jnp.concatenate([x, x1, x2, x3], axis=-1)))
    x5 = self.conv5(jnp.concatenate([x, x1, x2, x3, x4], axis=-1))
    return x5 * _RES_SCALE + x


class RRDB(nnx.Module):
  """Residual-in-residual dense block: three dense blocks and a scaled skip."""

  def __init__(self, num_feat: int, num_grow_ch: int, *, policy: Policy, rngs: nnx.Rngs, zero: bool = False):
    self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch, policy=policy, rngs=rngs, zero=zero)
    self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch, policy=policy, rngs=rngs, zero=zero)
    self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch, policy=policy, rngs=rngs, zero=zero)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.rdb3(self.rdb2(self.rdb1(x))) * _RES_SCALE + x


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
  """NHWC space-to-depth with torch's channel order (c * f * f + dy * f + dx)."""
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"pixel_unshuffle by {factor} needs H and W divisible by it, got {h}x{w}")
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // factor, w // factor, c * factor * factor)


def upsample_nearest2x(x: jax.Array) -> jax.Array:
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class RRDBNet(nnx.Module):
  """x (B, H, W, num_in_ch) in [0, 1] -> (B, 4H/.., 4W/.., num_out_ch); output not clipped."""

  def __init__(self, config: RRDBNetConfig = RRDBNetConfig(), *, policy: Policy = FP32, rngs: nnx.Rngs,
               scan: bool = True, init_weights: bool = True):
    """scan: run the RRDB stack as a lax.scan (fast compile) rather than unrolled (same numbers).
    init_weights: False fills zeros instead of random values, for weights about to be loaded (random init
    compiles one sampler per kernel shape: ~5x slower to build on CPU)."""
    self.config = config
    self.policy = policy
    self.scan = scan
    f, g = config.num_feat, config.num_grow_ch
    zero = not init_weights
    kw = dict(policy=policy, rngs=rngs, zero_init=zero)
    in_ch = config.num_in_ch * config.unshuffle ** 2
    self.conv_first = conv(in_ch, f, 3, **kw)
    self.body = nnx.List([RRDB(f, g, policy=policy, rngs=rngs, zero=zero) for _ in range(config.num_block)])
    self.conv_body = conv(f, f, 3, **kw)
    self.conv_up1 = conv(f, f, 3, **kw)
    self.conv_up2 = conv(f, f, 3, **kw)
    self.conv_hr = conv(f, f, 3, **kw)
    self.conv_last = conv(f, config.num_out_ch, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.config.num_in_ch:
      raise ValueError(f"RRDBNet expects (B, H, W, {self.config.num_in_ch}) input, got shape {x.shape}")
    x = x.astype(self.policy.dtype)
    if self.config.unshuffle > 1:
      x = pixel_unshuffle(x, self.config.unshuffle)
    feat = self.conv_first(x)
    feat = feat + self.conv_body(self._run_body(feat))
    feat = _lrelu(self.conv_up1(upsample_nearest2x(feat)))
    feat = _lrelu(self.conv_up2(upsample_nearest2x(feat)))
    return self.conv_last(_lrelu(self.conv_hr(feat)))

  def _run_body(self, feat: jax.Array) -> jax.Array:
    if not self.scan or len(self.body) < 2:
      for block in self.body:
        feat = block(feat)
      return feat
    # One compiled RRDB scanned over the stacked block weights: 4x faster to compile on XLA CPU than 23
    # unrolled copies, same run time. Stacking copies the body weights once per call (small next to the convs).
    graphdef, _ = nnx.split(self.body[0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.split(b)[1] for b in self.body))

    def step(h, state):
      return nnx.merge(graphdef, state)(h), None

    return jax.lax.scan(step, feat, stacked)[0]


def build(config: RRDBNetConfig, *, policy: Policy = FP32, rngs: nnx.Rngs, **runtime_options) -> RRDBNet:
  return RRDBNet(config, policy=policy, rngs=rngs, **runtime_options)


def conv_names(config: RRDBNetConfig) -> list[str]:
  """BasicSR names of the convolutions in module (= forward = ncnn file) order."""
  names = ["conv_first"]
  for b in range(config.num_block):
    names += [f"body.{b}.rdb{r}.conv{j}" for r in (1, 2, 3) for j in range(1, 6)]
  return names + ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def conv_io(config: RRDBNetConfig) -> list[tuple[int, int, bool]]:
  """(out_ch, in_ch, followed_by_leaky_relu) of every conv in conv_names order."""
  f, g = config.num_feat, config.num_grow_ch
  io = [(f, config.num_in_ch * config.unshuffle ** 2, False)]
  for _ in range(config.num_block * 3):
    io += [(g, f + j * g, True) for j in range(4)] + [(f, f + 4 * g, False)]
  return io + [(f, f, False), (f, f, True), (f, f, True), (f, f, True), (config.num_out_ch, f, False)]


MODEL_KIND = ModelKind(RRDBNetConfig, build)
