"""CasSR's stage-2 denoiser: frozen SD U-Net + weight-shared ControlNet + multiple attention (paper Fig. 2).

Forward pass, for noisy latents x_t, the bicubic-upsampled LR image and the stage-1 reference image:
  1. ControlNet runs ONCE on the batch [LR; ref] (shared weights): per skip connection k it gives
     LR features L_k and reference features R_k (taken before the zero convolutions).
  2. The U-Net's down path and mid block run as in SD; the ControlNet residuals of the LR branch are added
     to the skips and the mid block (switch `residual_add`).
  3. In every transformer block of the cross-attention up blocks:
        reference attention (Q: tokens, K/V: R_k) -> self-attention -> LR attention (Q: tokens, K/V: L_k)
        -> text cross-attention -> feed-forward,
     where k is the skip connection that up-block layer consumes (same resolution). The new attentions
     have their own LayerNorm and projections, a residual add, and zero-initialised output projections, so
     an untrained CasSR computes exactly SD + ControlNet.
Parameters: `unet` is frozen SD; `controlnet` and `multi_attention` are trained (see trained_parts).
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from flax import nnx

from cassr_jax.models import ModelKind
from cassr_jax.models.blocks import Attention
from cassr_jax.models.controlnet import ControlNetConfig, ControlNetModel, copy_unet_encoder
from cassr_jax.models.unet import CROSS_UP, UNet2DConditionModel, UNetConfig
from cassr_jax.nn import layers
from cassr_jax.nn.layers import FP32, Policy

REFERENCE_SOURCES = ("activation", "lr")


@dataclasses.dataclass(frozen=True)
class CasSRConfig:
  unet: UNetConfig = UNetConfig()
  controlnet: ControlNetConfig = ControlNetConfig()
  multiple_attention: bool = True   # off: the paper's "residual add only" ablation
  residual_add: bool = True         # add the LR branch's ControlNet residuals to the U-Net skips
  reference_source: str = "activation"  # "lr": the LR image itself is the reference (paper ablation)
  conditioning_scale: float = 1.0

  def __post_init__(self):
    if self.reference_source not in REFERENCE_SOURCES:
      raise ValueError(f"reference_source must be one of {REFERENCE_SOURCES}, got {self.reference_source!r}")
    if not (self.multiple_attention or self.residual_add):
      raise ValueError("CasSR config: multiple_attention and residual_add are both off; the ControlNet "
                       "would not influence the output")
    down = (self.unet.block_out_channels, self.unet.layers_per_block)
    if down != (self.controlnet.block_out_channels, self.controlnet.layers_per_block):
      raise ValueError("CasSR config: the ControlNet's down path must match the U-Net's "
                       f"(U-Net {down}, ControlNet "
                       f"{(self.controlnet.block_out_channels, self.controlnet.layers_per_block)})")

  @classmethod
  def from_unet(cls, unet: UNetConfig, **overrides) -> "CasSRConfig":
    return cls(unet=unet, controlnet=ControlNetConfig.from_unet(unet), **overrides)



class MultipleAttention(nnx.Module):
  """The two new attentions of one transformer block: reference attention and LR attention."""

  def __init__(self, dim: int, feature_channels: int, *, heads: int, upcast: bool, attention: str,
               policy: Policy = FP32, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    attn_kw = dict(heads=heads, head_dim=dim // heads, context_dim=feature_channels, upcast=upcast,
                   attention=attention, zero_out=True, **kw)
    self.norm_ref = layers.layer_norm(dim, **kw)
    self.ref_attn = Attention(dim, **attn_kw)
    self.norm_lr = layers.layer_norm(dim, **kw)
    self.lr_attn = Attention(dim, **attn_kw)

  def reference(self, x, features):
    return x + self.ref_attn(self.norm_ref(x), features)

  def lr(self, x, features):
    return x + self.lr_attn(self.norm_lr(x), features)


def _tokens(feature):
  b, h, w, c = feature.shape
  return feature.reshape(b, h * w, c)


class CasSRUNet(nnx.Module):
  """Inputs: latents (B, h, w, 4), timesteps, text context, lr_up and ref images (B, 8h, 8w, 3) in [0, 1]."""

  def __init__(self, config: CasSRConfig, *, policy: Policy = FP32, attention: str = "auto", remat: str = "none",
               rngs: nnx.Rngs):
    """remat: rematerialisation policy of the U-Net and ControlNet blocks (blocks.REMAT_POLICIES); the
    multiple attentions run inside the U-Net's transformer blocks, so they are rematerialised with them."""
    self.config = config
    self.unet = UNet2DConditionModel(config.unet, policy=policy, attention=attention, remat=remat, rngs=rngs)
    # The hint encoder's last conv is not zeroed: CasSR reads the features directly, and a zero conv there
    # would keep LR and reference features identical and delay every hint-encoder gradient by a step.
    self.controlnet = ControlNetModel(config.controlnet, policy=policy, attention=attention,
                                      zero_hint_out=False, remat=remat, rngs=rngs)
    self.slots = tuple(self._attention_slots())  # (up block, layer, skip index) per multiple attention
    if config.multiple_attention:
      ucfg = config.unet
      rev = tuple(reversed(ucfg.block_out_channels))
      rev_heads = tuple(reversed(ucfg.heads))
      skip_ch = self.controlnet.skip_channels
      self.multi_attention = nnx.List([
          MultipleAttention(rev[i], skip_ch[k], heads=rev_heads[i], upcast=ucfg.upcast_attention,
                            attention=attention, policy=policy, rngs=rngs) for i, _, k in self.slots])
    else:
      self.multi_attention = None

  def _attention_slots(self):
    n_skips = len(self.controlnet.skip_channels)
    per_block = self.config.unet.layers_per_block + 1
    for i, kind in enumerate(self.config.unet.up_block_types):
      if kind == CROSS_UP:
        for j in range(per_block):
          yield i, j, n_skips - 1 - (i * per_block + j)

  def __call__(self, sample, timesteps, context, lr_up, ref=None):
    cfg = self.config
    b = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    use_ref = cfg.reference_source == "activation" and cfg.multiple_attention
    if use_ref and ref is None:
      raise ValueError("CasSR with reference_source='activation' needs the stage-1 reference image `ref`")
    if use_ref:  # one ControlNet pass over [LR; ref]
      twice = lambda a: jnp.concatenate([a, a], axis=0)
      skips_c, mid_c = self.controlnet.features(
          twice(sample), twice(timesteps), twice(context), jnp.concatenate([lr_up, ref], axis=0))
      lr_feats, ref_feats = [s[:b] for s in skips_c], [s[b:] for s in skips_c]
      mid_c = mid_c[:b]
    else:
      lr_feats, mid_c = self.controlnet.features(sample, timesteps, context, lr_up)
      ref_feats = lr_feats

    unet = self.unet
    context = context.astype(unet.dtype)
    temb = unet.time_embed(timesteps, b)
    x, skips = unet.encode(sample, temb, context)
    x = unet.mid_block(x, temb, context)
    if cfg.residual_add:
      down_res, mid_res = self.controlnet.residuals(lr_feats, mid_c, cfg.conditioning_scale)
      skips = [s + r for s, r in zip(skips, down_res)]
      x = x + mid_res

    return unet.decode(x, skips, temb, context, self.up_attention_kwargs(ref_feats, lr_feats))

  def up_attention_kwargs(self, ref_feats, lr_feats):
    """Per up block and layer, the hooks that run the multiple attention around the self-attention
    (None without multiple attention); ref_feats / lr_feats: ControlNet features per skip index."""
    if self.multi_attention is None:
      return None
    up_kwargs = [[{} for _ in block.resnets] for block in self.unet.up_blocks]
    for (i, j, k), ma in zip(self.slots, self.multi_attention):
      up_kwargs[i][j] = {
          "before_self": functools.partial(ma.reference, features=_tokens(ref_feats[k])),
          "after_self": functools.partial(ma.lr, features=_tokens(lr_feats[k])),
      }
    return up_kwargs

  def trained_parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ControlNet and multiple attention train, minus the ControlNet parts that cannot influence the output;
    the SD U-Net stays frozen (cassr_jax.models.trainable_filter)."""
    return ("multi_attention", "controlnet"), tuple("controlnet." + u for u in self.unused_controlnet_parts())

  def unused_controlnet_parts(self) -> tuple[str, ...]:
    """ControlNet sub-modules that cannot influence the output in this configuration (frozen, so the
    optimizer keeps no state for them and every trained parameter gets a gradient)."""
    if self.config.residual_add:
      return ()
    parts = ["controlnet_down_blocks", "controlnet_mid_block", "mid_block"]
    last_read = max(k for _, _, k in self.slots)
    owner = []  # skip index -> (down block, part)
    owner.append((-1, "conv_in"))
    for d, block in enumerate(self.controlnet.down_blocks):
      owner += [(d, "layers")] * len(block.resnets)
      if block.downsamplers is not None:
        owner.append((d, "downsamplers"))
    last_block, last_part = owner[last_read]
    for d in range(len(self.controlnet.down_blocks)):
      if d > last_block:
        parts.append(f"down_blocks.{d}")
    if last_part == "layers" and self.controlnet.down_blocks[last_block].downsamplers is not None:
      parts.append(f"down_blocks.{last_block}.downsamplers")
    return tuple(parts)


def cassr_from_pretrained(unet: UNet2DConditionModel, config: CasSRConfig | None = None,
                          controlnet: ControlNetModel | None = None, *, policy: Policy = FP32,
                          attention: str = "auto", remat: str = "none", seed: int = 0) -> CasSRUNet:
  """CasSR initialised from a (converted) SD U-Net: the ControlNet copies the U-Net's encoder (ControlNet's
  recipe) unless a converted ControlNet is given; multiple-attention output projections start at zero."""
  config = config or CasSRConfig.from_unet(unet.config)
  model = CasSRUNet(config, policy=policy, attention=attention, remat=remat, rngs=nnx.Rngs(seed))
  nnx.update(model.unet, nnx.state(unet, nnx.Param))
  if controlnet is not None:
    nnx.update(model.controlnet, nnx.state(controlnet, nnx.Param))
  else:
    copy_unet_encoder(unet, model.controlnet)
  return model


def build(config: CasSRConfig, *, policy: Policy = FP32, rngs: nnx.Rngs, attention: str = "auto",
          remat: str = "none"):
  return CasSRUNet(config, policy=policy, attention=attention, remat=remat, rngs=rngs)


MODEL_KIND = ModelKind(CasSRConfig, build)
