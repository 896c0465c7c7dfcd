"""CLIP text encoder (the text tower SD conditions on) in Flax NNX, named as transformers' CLIPTextModel.

Our parameter paths are the SD checkpoint keys ("text_model.embeddings.token_embedding.weight", ...); the key
quirks of other checkpoints are handled in cassr_jax.convert.keys.

Pre-LN transformer with a causal mask (token i sees tokens 0..i), learned positions, quick-GELU (CLIP ViT-L/14,
SD-1.x) or GELU (OpenCLIP, SD-2.x) MLPs, and a final LayerNorm. SD-1.x conditions on last_hidden_state;
SD-2.x on the penultimate layer (hidden_layer=-2 here, then the final LayerNorm, as diffusers' clip_skip).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cassr_jax.models import ModelKind
from cassr_jax.nn import layers
from cassr_jax.nn.attention import dot_product_attention
from cassr_jax.nn.layers import FP32, Policy

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Defaults are SD-1.5's text encoder (openai/clip-vit-large-patch14's text tower)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2  # SD-1.5's config still has the pre-2023 value 2: pool at argmax(input_ids)

  def __post_init__(self):
    problems = []
    if self.hidden_act not in ACTIVATIONS:
      problems.append(f"hidden_act={self.hidden_act!r} (supported: {sorted(ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      problems.append(f"hidden_size={self.hidden_size} is not a multiple of "
                      f"num_attention_heads={self.num_attention_heads}")
    if problems:
      raise ValueError("unsupported CLIPTextConfig: " + ", ".join(problems))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def sd15(cls) -> "CLIPTextConfig":
    return cls()

  @classmethod
  def from_transformers(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a transformers text_encoder/config.json dict (a CLIPTextConfig, or a CLIPConfig's text_config).

    Keys that do not change the text tower's computation (dropout, init ranges, dtypes, ...) are ignored;
    missing keys take transformers' CLIPTextConfig defaults.
    """
    if cfg.get("model_type") == "clip" or "text_config" in cfg:
      cfg = cfg.get("text_config") or {}
    if cfg.get("model_type", "clip_text_model") != "clip_text_model":
      raise ValueError(f"unsupported text encoder model_type {cfg['model_type']!r} (expected clip_text_model)")
    eos = cfg.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
      raise ValueError(f"unsupported CLIPTextConfig: several eos_token_id {eos}")
    return cls(
        vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg.get("hidden_size", 512),
        intermediate_size=cfg.get("intermediate_size", 2048),
        num_hidden_layers=cfg.get("num_hidden_layers", 12),
        num_attention_heads=cfg.get("num_attention_heads", 8),
        max_position_embeddings=cfg.get("max_position_embeddings", 77),
        hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), eos_token_id=eos)


class CLIPTextOutput(NamedTuple):
  last_hidden_state: jax.Array  # (B, T, D) after final_layer_norm
  pooler_output: jax.Array      # (B, D) last_hidden_state at each sequence's end-of-text token
  hidden_state: jax.Array | None  # (B, T, D) the requested layer's output, before any final LayerNorm


class CLIPAttention(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, attention: str, policy: Policy, rngs: nnx.Rngs):
    d = cfg.hidden_size
    kw = dict(policy=policy, rngs=rngs)
    self.heads, self.head_dim, self.attention = cfg.num_attention_heads, cfg.head_dim, attention
    self.q_proj = layers.linear(d, d, **kw)
    self.k_proj = layers.linear(d, d, **kw)
    self.v_proj = layers.linear(d, d, **kw)
    self.out_proj = layers.linear(d, d, **kw)

  def __call__(self, x):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, self.head_dim)
    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                implementation=self.attention, is_causal=True)
    return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, policy: Policy, rngs: nnx.Rngs):
    self.activation = cfg.hidden_act
    self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, policy=policy, rngs=rngs)
    self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, policy=policy, rngs=rngs)

  def __call__(self, x):
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, attention: str, policy: Policy, rngs: nnx.Rngs):
    kw = dict(policy=policy, rngs=rngs)
    self.self_attn = CLIPAttention(cfg, attention=attention, **kw)
    self.layer_norm1 = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
    self.mlp = CLIPMLP(cfg, **kw)
    self.layer_norm2 = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, attention: str, policy: Policy, rngs: nnx.Rngs):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, attention=attention, policy=policy, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, policy: Policy, rngs: nnx.Rngs):
    self.token_embedding = layers.embed(cfg.vocab_size, cfg.hidden_size, policy=policy, rngs=rngs)
    self.position_embedding = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, policy=policy,
                                           rngs=rngs)

  def __call__(self, input_ids):
    positions = jnp.arange(input_ids.shape[-1])
    return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, attention: str, policy: Policy, rngs: nnx.Rngs):
    self.embeddings = CLIPTextEmbeddings(cfg, policy=policy, rngs=rngs)
    self.encoder = CLIPEncoder(cfg, attention=attention, policy=policy, rngs=rngs)
    self.final_layer_norm = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, policy=policy, rngs=rngs)


class CLIPTextModel(nnx.Module):
  """input_ids (B, T) int, T <= max_position_embeddings -> CLIPTextOutput."""

  def __init__(self, config: CLIPTextConfig, *, policy: Policy = FP32, attention: str = "auto",
               rngs: nnx.Rngs):
    self.config = config
    self.text_model = CLIPTextTransformer(config, attention=attention, policy=policy, rngs=rngs)

  def final_layer_norm(self, hidden_state):
    """The final LayerNorm, for callers that condition on an inner layer (diffusers' clip_skip)."""
    return self.text_model.final_layer_norm(hidden_state)

  def __call__(self, input_ids, *, hidden_layer: int | None = None) -> CLIPTextOutput:
    """hidden_layer indexes transformers' hidden_states: 0 = embeddings, i = output of layer i,
    -1 = last layer (before final_layer_norm), -2 = penultimate (SD-2.x)."""
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"CLIPTextModel: input_ids must be a (batch, tokens) integer array, got "
                       f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"CLIPTextModel: {input_ids.shape[1]} tokens exceed max_position_embeddings="
                       f"{cfg.max_position_embeddings}; truncate them in the tokenizer")
    n = cfg.num_hidden_layers
    if hidden_layer is not None and not -(n + 1) <= hidden_layer <= n:
      raise ValueError(f"CLIPTextModel: hidden_layer={hidden_layer} is outside [-{n + 1}, {n}]")
    wanted = None if hidden_layer is None else hidden_layer % (n + 1)
    x = self.text_model.embeddings(input_ids)
    hidden_state = x if wanted == 0 else None
    for i, layer in enumerate(self.text_model.encoder.layers, start=1):
      x = layer(x)
      if i == wanted:
        hidden_state = x
    last = self.text_model.final_layer_norm(x)
    if cfg.eos_token_id == 2:
      # Legacy configs: the end-of-text token has the largest id in CLIP's vocabulary.
      eos_index = jnp.argmax(input_ids, axis=-1)
    else:
      eos_index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last, pooled, hidden_state)


def build(config: CLIPTextConfig, *, policy: Policy = FP32, rngs: nnx.Rngs, attention: str = "auto"):
  return CLIPTextModel(config, policy=policy, attention=attention, rngs=rngs)


MODEL_KIND = ModelKind(CLIPTextConfig, build)
