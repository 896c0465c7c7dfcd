"""SD-1.x/2.x UNet2DConditionModel in Flax NNX (diffusers' module names, NHWC layout).

Supported diffusers config options: CrossAttnDownBlock2D/DownBlock2D, CrossAttnUpBlock2D/UpBlock2D,
UNetMidBlock2DCrossAttn, any block widths, layers per block, heads (attention_head_dim, int or per block, is
the head COUNT as in diffusers' SD configs; num_attention_heads likewise), cross-attention dim, linear
projection (SD-2), upcast attention, GroupNorm groups and eps, flip_sin_to_cos and freq_shift.
Everything else raises a clear "unsupported" error.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from cassr_jax.models import ModelKind
from cassr_jax.models.blocks import (Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2DModel,
                                     Upsample2D, check_remat, remat_call, timestep_embedding)
from cassr_jax.nn import layers
from cassr_jax.nn.layers import FP32, Policy

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
  up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
  layers_per_block: int = 2
  heads: tuple[int, ...] = (8, 8, 8, 8)  # per down block; up blocks use the reverse
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @classmethod
  def sd15(cls) -> "UNetConfig":
    return cls()

  @classmethod
  def from_diffusers(cls, cfg: dict[str, Any]) -> "UNetConfig":
    """From a diffusers unet/config.json dict (missing keys take diffusers' defaults).

    Options we do not implement raise ValueError naming each of them, as do keys this converter does not
    know (a newer diffusers option could change the network silently otherwise); keys starting with "_"
    are metadata and ignored.
    """
    problems = []
    for key, value in cfg.items():
      if key.startswith("_") or key in _PARSED_KEYS or key in _IGNORED_KEYS:
        continue
      if key not in _OFF_VALUES:
        problems.append(f"unknown option {key}={value!r}")
      elif _uniform(value) not in _OFF_VALUES[key]:
        problems.append(f"{key}={value!r} (supported: {' or '.join(map(repr, _OFF_VALUES[key]))})")
    get = lambda key, default: _uniform(cfg.get(key, default))
    channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
    down = tuple(cfg.get("down_block_types", cls.down_block_types))
    # No up_block_types (a ControlNet config): the mirror of the down path (diffusers' default for SD's).
    mirror = tuple({CROSS_DOWN: CROSS_UP, PLAIN_DOWN: PLAIN_UP}.get(t, t) for t in reversed(down))
    up = tuple(cfg.get("up_block_types", mirror))
    problems += [f"down block {t!r} (supported: {CROSS_DOWN}, {PLAIN_DOWN})" for t in dict.fromkeys(down)
                 if t not in (CROSS_DOWN, PLAIN_DOWN)]
    problems += [f"up block {t!r} (supported: {CROSS_UP}, {PLAIN_UP})" for t in dict.fromkeys(up)
                 if t not in (CROSS_UP, PLAIN_UP)]
    # diffusers' SD configs name the head COUNT attention_head_dim (diffusers issue 2011).
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(channels)
    cross = get("cross_attention_dim", 1280)
    layers_per_block = get("layers_per_block", 2)
    for name, value in (("cross_attention_dim", cross), ("layers_per_block", layers_per_block)):
      if isinstance(value, (list, tuple)):
        problems.append(f"per-block {name}={list(value)} (supported: one value for all blocks)")
    if not len(down) == len(up) == len(heads) == len(channels):
      problems.append(f"{len(channels)} block_out_channels but {len(down)} down blocks, {len(up)} up blocks "
                      f"and {len(heads)} head counts")
    if problems:
      raise ValueError("unsupported UNet2DConditionModel config: " + "; ".join(problems))
    return cls(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
        block_out_channels=channels, down_block_types=down, up_block_types=up,
        layers_per_block=layers_per_block, heads=heads, cross_attention_dim=cross,
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=cfg.get("downsample_padding", 1))


# diffusers UNet2DConditionModel options we read.
_PARSED_KEYS = frozenset({
    "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim",
    "use_linear_projection", "upcast_attention", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
    "freq_shift", "downsample_padding"})
# Options without effect on the network (or only with an option that is rejected below).
_IGNORED_KEYS = frozenset({"sample_size", "addition_embed_type_num_heads", "addition_time_embed_dim"})
# Options we do not implement, with the values at which they are off (a per-block list of one repeated
# value counts as that value).
_OFF_VALUES: dict[str, tuple] = {
    "center_input_sample": (False,), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,), "addition_embed_type": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,), "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,), "attention_type": ("default",), "cross_attention_norm": (None,),
    "transformer_layers_per_block": (1,), "reverse_transformer_layers_per_block": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "mid_block_scale_factor": (1.0,), "act_fn": ("silu",),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "dropout": (0.0,),
}


def _uniform(value):
  """A per-block list whose entries are all equal stands for that one value."""
  if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
    return value[0]
  return value


def _transformer(cfg: UNetConfig, channels: int, heads: int, attention: str, policy: Policy, rngs: nnx.Rngs):
  return Transformer2DModel(
      channels, heads=heads, head_dim=channels // heads, context_dim=cfg.cross_attention_dim,
      groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
      upcast=cfg.upcast_attention, attention=attention, policy=policy, rngs=rngs)


def _resnet(resnet, x, temb):
  return resnet(x, temb)


def _attend(attention, x, context):
  return attention(x, context)


class DownBlock(nnx.Module):
  """CrossAttnDownBlock2D (with attentions) or DownBlock2D (without)."""

  def __init__(self, cfg: UNetConfig, index: int, in_ch: int, *, attention: str, policy: Policy, rngs: nnx.Rngs,
               remat: str = "none"):
    self.remat = check_remat(remat)
    out_ch = cfg.block_out_channels[index]
    kw = dict(policy=policy, rngs=rngs)
    res_kw = dict(temb_ch=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)
    n = cfg.layers_per_block
    self.resnets = nnx.List([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, **res_kw) for j in range(n)])
    self.attentions = (nnx.List([_transformer(cfg, out_ch, cfg.heads[index], attention, **kw) for _ in range(n)])
                       if cfg.down_block_types[index] == CROSS_DOWN else None)
    is_final = index == len(cfg.block_out_channels) - 1
    self.downsamplers = (None if is_final else
                         nnx.List([Downsample2D(out_ch, padding=cfg.downsample_padding, **kw)]))

  def __call__(self, x, temb, context):
    skips = []
    for j, resnet in enumerate(self.resnets):
      x = remat_call(self.remat, _resnet, resnet, x, temb)
      if self.attentions is not None:
        x = remat_call(self.remat, _attend, self.attentions[j], x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class MidBlock(nnx.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

  def __init__(self, cfg: UNetConfig, *, attention: str, policy: Policy, rngs: nnx.Rngs, remat: str = "none"):
    self.remat = check_remat(remat)
    ch = cfg.block_out_channels[-1]
    kw = dict(policy=policy, rngs=rngs)
    res_kw = dict(temb_ch=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, **res_kw), ResnetBlock2D(ch, ch, **res_kw)])
    self.attentions = nnx.List([_transformer(cfg, ch, cfg.heads[-1], attention, **kw)])

  def __call__(self, x, temb, context):
    x = remat_call(self.remat, _resnet, self.resnets[0], x, temb)
    x = remat_call(self.remat, _attend, self.attentions[0], x, context)
    return remat_call(self.remat, _resnet, self.resnets[1], x, temb)


class UpBlock(nnx.Module):
  """CrossAttnUpBlock2D or UpBlock2D: each layer concatenates one skip connection (last-in, first-out)."""

  def __init__(self, cfg: UNetConfig, index: int, prev_ch: int, *, attention: str, policy: Policy,
               rngs: nnx.Rngs, remat: str = "none"):
    self.remat = check_remat(remat)
    rev = tuple(reversed(cfg.block_out_channels))
    out_ch = rev[index]
    skip_in = rev[min(index + 1, len(rev) - 1)]
    n = cfg.layers_per_block + 1
    kw = dict(policy=policy, rngs=rngs)
    res_kw = dict(temb_ch=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)
    self.resnets = nnx.List([
        ResnetBlock2D((prev_ch if j == 0 else out_ch) + (skip_in if j == n - 1 else out_ch), out_ch, **res_kw)
        for j in range(n)])
    heads = tuple(reversed(cfg.heads))[index]
    self.attentions = (nnx.List([_transformer(cfg, out_ch, heads, attention, **kw) for _ in range(n)])
                       if cfg.up_block_types[index] == CROSS_UP else None)
    self.upsamplers = None if index == len(rev) - 1 else nnx.List([Upsample2D(out_ch, **kw)])

  def __call__(self, x, skips, temb, context, attention_kwargs: Sequence[dict] | None = None):
    """skips: this block's skip tensors in consumption order. attention_kwargs: per-layer extra inputs
    for the transformer blocks (used by CasSR's multiple attention)."""
    for j, resnet in enumerate(self.resnets):
      x = remat_call(self.remat, _resnet, resnet, jnp.concatenate([x, skips[j]], axis=-1), temb)
      if self.attentions is not None:
        extra = attention_kwargs[j] if attention_kwargs is not None else {}
        # The hooks (CasSR's multiple attention) run inside the rematerialised block: their modules and
        # features enter as closed-over values, which jax.checkpoint differentiates like arguments.
        x = remat_call(self.remat, lambda attn, x, context: attn(x, context, **extra), self.attentions[j], x,
                       context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


def set_remat(model: nnx.Module, remat: str) -> nnx.Module:
  """Sets the rematerialisation policy of every U-Net / ControlNet block inside `model` (in place)."""
  remat = check_remat(remat)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (DownBlock, MidBlock, UpBlock)):
      node.remat = remat
  return model


def embed_timesteps(time_embedding: TimestepEmbedding, cfg: UNetConfig, timesteps, batch: int, dtype):
  """(B,) or scalar timesteps -> (B, time_embed_dim) through the sinusoidal features and the MLP."""
  timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
  emb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                           freq_shift=cfg.freq_shift)
  return time_embedding(emb.astype(dtype))


def down_path(down_blocks, x, temb, context):
  """Runs the down blocks on the conv_in output x; returns the bottom feature and every skip tensor."""
  skips = [x]
  for block in down_blocks:
    x, block_skips = block(x, temb, context)
    skips.extend(block_skips)
  return x, skips


class UNet2DConditionModel(nnx.Module):
  """SD U-Net. Inputs: latents (B, H, W, C), timesteps (B,), text context (B, T, D); NHWC output."""

  def __init__(self, config: UNetConfig, *, policy: Policy = FP32, attention: str = "auto", remat: str = "none",
               rngs: nnx.Rngs):
    """remat: rematerialisation policy of every resnet and transformer block (blocks.REMAT_POLICIES)."""
    cfg = self.config = config
    kw = dict(policy=policy, rngs=rngs)
    ch = cfg.block_out_channels
    self.conv_in = layers.conv(cfg.in_channels, ch[0], 3, **kw)
    self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, **kw)
    self.down_blocks = nnx.List([
        DownBlock(cfg, i, ch[max(i - 1, 0)], attention=attention, remat=remat, **kw) for i in range(len(ch))])
    self.mid_block = MidBlock(cfg, attention=attention, remat=remat, **kw)
    rev = tuple(reversed(ch))
    self.up_blocks = nnx.List([
        UpBlock(cfg, i, rev[max(i - 1, 0)], attention=attention, remat=remat, **kw) for i in range(len(ch))])
    self.conv_norm_out = layers.group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
    self.conv_out = layers.conv(ch[0], cfg.out_channels, 3, **kw)
    self.dtype = policy.dtype

  def time_embed(self, timesteps, batch: int):
    return embed_timesteps(self.time_embedding, self.config, timesteps, batch, self.dtype)

  def encode(self, sample, temb, context):
    """conv_in and the down path: returns the bottom feature and all skip tensors (in creation order)."""
    return down_path(self.down_blocks, self.conv_in(sample.astype(self.dtype)), temb, context)

  def decode(self, x, skips, temb, context, up_attention_kwargs=None):
    """The up path, consuming `skips` from the end; up_attention_kwargs[i][j] feeds block i, layer j."""
    skips = list(skips)
    for i, block in enumerate(self.up_blocks):
      n = len(block.resnets)
      block_skips = skips[-n:][::-1]
      del skips[-n:]
      x = block(x, block_skips, temb, context,
                None if up_attention_kwargs is None else up_attention_kwargs[i])
    x = self.conv_out(nnx.silu(self.conv_norm_out(x)))
    return x

  def __call__(self, sample, timesteps, context, *, down_residuals=None, mid_residual=None):
    """down_residuals / mid_residual: ControlNet outputs added to the skips and after the mid block."""
    context = context.astype(self.dtype)
    temb = self.time_embed(timesteps, sample.shape[0])
    x, skips = self.encode(sample, temb, context)
    if down_residuals is not None:
      if len(down_residuals) != len(skips):
        raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
    x = self.mid_block(x, temb, context)
    if mid_residual is not None:
      x = x + mid_residual.astype(x.dtype)
    return self.decode(x, skips, temb, context)


def build(config: UNetConfig, *, policy: Policy = FP32, rngs: nnx.Rngs, attention: str = "auto",
          remat: str = "none"):
  return UNet2DConditionModel(config, policy=policy, attention=attention, remat=remat, rngs=rngs)


MODEL_KIND = ModelKind(UNetConfig, build)
