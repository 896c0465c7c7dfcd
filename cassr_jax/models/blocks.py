"""Building blocks of the SD-1.x/2.x U-Net and VAE, named as diffusers names them (so checkpoints map 1:1).

Layout is NHWC for images and (B, T, C) for token sequences.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax.nn import layers
from cassr_jax.nn.attention import dot_product_attention
from cassr_jax.nn.layers import FP32, Policy

# Rematerialisation (gradient checkpointing) of the U-Net / ControlNet blocks: the name picks which values
# of a block's forward pass the backward pass keeps; the rest is recomputed. "none" keeps everything.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,   # keep only the block inputs (least memory)
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul/conv outputs, redo the cheap ops
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(remat: str | bool) -> str:
  """The policy name; a config's boolean switch means "full" (True) or "none" (False)."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
  return remat


def remat_call(remat: str, fn, *args):
  """fn(*args) (modules among the args), rematerialised under the named policy unless remat == "none"."""
  if remat == "none":
    return fn(*args)
  # No write-back of the inputs' state (graph_updates=False): blocks mutate nothing, and a write-back would
  # fail for modules whose variables come from an outer trace (for example frozen weights under jax.grad).
  return nnx.remat(fn, policy=REMAT_POLICIES[remat], graph_updates=False)(*args)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps -> (B, dim) in fp32 (diffusers' Timesteps)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""

  def __init__(self, in_dim: int, dim: int, *, policy: Policy = FP32, rngs: nnx.Rngs):
    self.linear_1 = layers.linear(in_dim, dim, policy=policy, rngs=rngs)
    self.linear_2 = layers.linear(dim, dim, policy=policy, rngs=rngs)

  def __call__(self, x):
    return self.linear_2(nnx.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  """GroupNorm-SiLU-conv twice, with an optional timestep bias between, and a 1x1 shortcut if widths differ."""

  def __init__(self, in_ch: int, out_ch: int, *, temb_ch: int | None, groups: int = 32, eps: float = 1e-5,
               policy: Policy = FP32, rngs: nnx.Rngs):
    self.norm1 = layers.group_norm(in_ch, groups, eps, policy=policy, rngs=rngs)
    self.conv1 = layers.conv(in_ch, out_ch, 3, policy=policy, rngs=rngs)
    self.time_emb_proj = (layers.linear(temb_ch, out_ch, policy=policy, rngs=rngs)
                          if temb_ch is not None else None)
    self.norm2 = layers.group_norm(out_ch, groups, eps, policy=policy, rngs=rngs)
    self.conv2 = layers.conv(out_ch, out_ch, 3, policy=policy, rngs=rngs)
    self.conv_shortcut = (layers.conv(in_ch, out_ch, 1, policy=policy, rngs=rngs)
                          if in_ch != out_ch else None)

  def __call__(self, x, temb=None):
    h = self.conv1(nnx.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv. padding=0 means the VAE's asymmetric (0, 1) pad on height and width."""

  def __init__(self, channels: int, *, padding: int = 1, policy: Policy = FP32, rngs: nnx.Rngs):
    self.padding = padding
    self.conv = layers.conv(channels, channels, 3, stride=2, padding=padding, policy=policy, rngs=rngs)

  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  def __init__(self, channels: int, *, policy: Policy = FP32, rngs: nnx.Rngs):
    self.conv = layers.conv(channels, channels, 3, policy=policy, rngs=rngs)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Attention(nnx.Module):
  """Multi-head attention with separate q/k/v projections and an output projection (to_out.0)."""

  def __init__(self, query_dim: int, *, heads: int, head_dim: int, context_dim: int | None = None,
               qkv_bias: bool = False, upcast: bool = False, attention: str = "auto",
               zero_out: bool = False, policy: Policy = FP32, rngs: nnx.Rngs):
    inner = heads * head_dim
    context_dim = query_dim if context_dim is None else context_dim
    self.heads, self.head_dim, self.upcast, self.attention = heads, head_dim, upcast, attention
    self.to_q = layers.linear(query_dim, inner, bias=qkv_bias, policy=policy, rngs=rngs)
    self.to_k = layers.linear(context_dim, inner, bias=qkv_bias, policy=policy, rngs=rngs)
    self.to_v = layers.linear(context_dim, inner, bias=qkv_bias, policy=policy, rngs=rngs)
    self.to_out = nnx.List([layers.linear(inner, query_dim, zero_init=zero_out, policy=policy, rngs=rngs)])

  def __call__(self, x, context=None):
    context = x if context is None else context
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, y.shape[1], self.heads, self.head_dim)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    out = dot_product_attention(q, k, v, implementation=self.attention, upcast=self.upcast)
    return self.to_out[0](out.reshape(b, t, self.heads * self.head_dim))


class GEGLU(nnx.Module):
  """Linear to 2x inner width; value * GELU(gate) (exact erf GELU, as torch's default)."""

  def __init__(self, dim: int, inner: int, *, policy: Policy = FP32, rngs: nnx.Rngs):
    self.proj = layers.linear(dim, 2 * inner, policy=policy, rngs=rngs)

  def __call__(self, x):
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """GEGLU then a linear back to dim; `net` indices follow diffusers (0: GEGLU, 1: dropout, 2: linear)."""

  def __init__(self, dim: int, *, mult: int = 4, policy: Policy = FP32, rngs: nnx.Rngs):
    inner = dim * mult
    self.net = nnx.Dict({"0": GEGLU(dim, inner, policy=policy, rngs=rngs),
                         "2": layers.linear(inner, dim, policy=policy, rngs=rngs)})

  def __call__(self, x):
    return self.net["2"](self.net["0"](x))


class BasicTransformerBlock(nnx.Module):
  """Pre-LN self-attention, text cross-attention and GEGLU feed-forward, each with a residual add."""

  def __init__(self, dim: int, *, heads: int, head_dim: int, context_dim: int, upcast: bool = False,
               attention: str = "auto", policy: Policy = FP32, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    attn_kw = dict(heads=heads, head_dim=head_dim, upcast=upcast, attention=attention, **kw)
    self.norm1 = layers.layer_norm(dim, **kw)
    self.attn1 = Attention(dim, **attn_kw)
    self.norm2 = layers.layer_norm(dim, **kw)
    self.attn2 = Attention(dim, context_dim=context_dim, **attn_kw)
    self.norm3 = layers.layer_norm(dim, **kw)
    self.ff = FeedForward(dim, **kw)

  def self_attention(self, x):
    return x + self.attn1(self.norm1(x))

  def text_attention_and_ff(self, x, context):
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))

  def __call__(self, x, context, before_self=None, after_self=None):
    """before_self / after_self: optional token -> token functions run around the self-attention
    (CasSR's reference and LR attentions)."""
    if before_self is not None:
      x = before_self(x)
    x = self.self_attention(x)
    if after_self is not None:
      x = after_self(x)
    return self.text_attention_and_ff(x, context)


class Transformer2DModel(nnx.Module):
  """GroupNorm, proj_in (1x1 conv, or linear for SD-2), transformer blocks on the tokens, proj_out, residual."""

  def __init__(self, channels: int, *, heads: int, head_dim: int, context_dim: int, num_layers: int = 1,
               groups: int = 32, use_linear_projection: bool = False, upcast: bool = False,
               attention: str = "auto", policy: Policy = FP32, rngs: nnx.Rngs):
    inner = heads * head_dim
    kw = dict(policy=policy, rngs=rngs)
    self.use_linear_projection = use_linear_projection
    self.norm = layers.group_norm(channels, groups, 1e-6, **kw)
    project = (lambda i, o: layers.linear(i, o, **kw)) if use_linear_projection else (
        lambda i, o: layers.conv(i, o, 1, **kw))
    self.proj_in = project(channels, inner)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads=heads, head_dim=head_dim, context_dim=context_dim, upcast=upcast,
                              attention=attention, **kw) for _ in range(num_layers)])
    self.proj_out = project(inner, channels)

  def __call__(self, x, context, **block_kwargs):
    b, h, w, _ = x.shape
    residual = x
    x = self.norm(x)
    if not self.use_linear_projection:
      x = self.proj_in(x)
    x = x.reshape(b, h * w, x.shape[-1])
    if self.use_linear_projection:
      x = self.proj_in(x)
    for block in self.transformer_blocks:
      x = block(x, context, **block_kwargs)
    if self.use_linear_projection:
      x = self.proj_out(x)
    x = x.reshape(b, h, w, x.shape[-1])
    if not self.use_linear_projection:
      x = self.proj_out(x)
    return x + residual
