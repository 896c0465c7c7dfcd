"""Scaled dot-product attention with one implementation switch for every model.

Layout everywhere: q (B, Tq, H, D), k and v (B, Tk, H, D) -> (B, Tq, H, D), as jax.nn.dot_product_attention.

implementation:
  "xla"       jax.nn.dot_product_attention's XLA path (materialises the B*H*Tq*Tk score matrix).
  "cudnn"     cuDNN fused attention (GPU only, bf16/fp16, head-dim limits per GPU generation).
  "blockwise" our online-softmax attention over query and key blocks: memory O(block^2) instead of
              O(Tq*Tk), and on CPU several times faster than the XLA path at SD-1.5's 4096 tokens.
  "auto"      cudnn where backend, dtype and head dim allow it, else blockwise for long sequences,
              else xla.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise")

# Sequences at least this long use the blockwise path under "auto" (where cuDNN does not apply).
BLOCKWISE_MIN_TOKENS = 1024


def _gpu_compute_capability() -> tuple[int, int] | None:
  device = jax.devices()[0]
  if device.platform != "gpu":
    return None
  cc = getattr(device, "compute_capability", None)
  if not cc:
    return None
  major, minor = str(cc).split(".")[:2]
  return int(major), int(minor)


def cudnn_supported(dtype, head_dim: int) -> bool:
  """Whether cuDNN fused attention can run here for this dtype and head dim.

  cuDNN needs fp16/bf16; head dims above 128 only on Hopper (sm90+) and up to 256 there. SD-1.5's
  head dim 160 therefore falls back on A100.
  """
  cc = _gpu_compute_capability()
  if cc is None or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  if head_dim % 8:
    return False
  limit = 256 if cc[0] >= 9 else 128
  return head_dim <= limit


def resolve_implementation(implementation: str, dtype, head_dim: int, kv_tokens: int) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  if cudnn_supported(dtype, head_dim):
    return "cudnn"
  return "blockwise" if kv_tokens >= BLOCKWISE_MIN_TOKENS else "xla"


def _pick_block(n: int, target: int) -> int:
  """Largest divisor of n that is <= target (so blocks tile the sequence exactly)."""
  if n <= target:
    return n
  for b in range(target, 0, -1):
    if n % b == 0:
      return b
  return n


@functools.partial(jax.jit, static_argnames=("q_block", "kv_block"))
def blockwise_attention(q, k, v, *, q_block: int = 1024, kv_block: int = 4096):
  """Online-softmax attention (flash-attention recurrence) written with lax.map/scan.

  Scores and the running max/denominator are kept in fp32 whatever the input dtype.
  """
  b, tq, h, d = q.shape
  tk = k.shape[1]
  qb = _pick_block(tq, q_block)
  kb = _pick_block(tk, kv_block)
  scale = 1.0 / jnp.sqrt(jnp.float32(d)).astype(jnp.float32)
  # (nq, B, H, qb, D) and (nk, B, H, kb, D)
  qs = (q * scale.astype(q.dtype)).reshape(b, tq // qb, qb, h, d).transpose(1, 0, 3, 2, 4)
  ks = k.reshape(b, tk // kb, kb, h, d).transpose(1, 0, 3, 2, 4)
  vs = v.reshape(b, tk // kb, kb, h, d).transpose(1, 0, 3, 2, 4)

  def one_query_block(qi):
    def step(carry, kv):
      acc, row_max, denom = carry
      kj, vj = kv
      s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32)
      new_max = jnp.maximum(row_max, s.max(axis=-1))
      correction = jnp.exp(row_max - new_max)
      p = jnp.exp(s - new_max[..., None])
      denom = denom * correction + p.sum(axis=-1)
      acc = acc * correction[..., None] + jnp.einsum(
          "bhqk,bhkd->bhqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
      return (acc, new_max, denom), None

    init = (jnp.zeros((b, h, qb, d), jnp.float32),
            jnp.full((b, h, qb), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, qb), jnp.float32))
    if ks.shape[0] == 1:
      (acc, _, denom), _ = step(init, (ks[0], vs[0]))
    else:
      (acc, _, denom), _ = jax.lax.scan(step, init, (ks, vs))
    return (acc / denom[..., None]).astype(q.dtype)

  out = jax.lax.map(one_query_block, qs) if qs.shape[0] > 1 else one_query_block(qs[0])[None]
  return out.transpose(1, 0, 3, 2, 4).reshape(b, tq, h, d)


def dot_product_attention(q, k, v, *, implementation: str = "auto", upcast: bool = False):
  """softmax(q k^T / sqrt(D)) v. `upcast` computes in fp32 (diffusers' upcast_attention)."""
  out_dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  impl = resolve_implementation(implementation, q.dtype, q.shape[-1], k.shape[1])
  if impl == "blockwise":
    out = blockwise_attention(q, k, v)
  else:
    out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
  return out.astype(out_dtype)
