"""Scaled dot-product attention with one implementation switch for every model.

Layout everywhere: q (B, Tq, H, D), k and v (B, Tk, H, D) -> (B, Tq, H, D), as jax.nn.dot_product_attention.

implementation:
  "xla"       jax.nn.dot_product_attention's XLA path: materialises the B*H*Tq*Tk score matrix.
  "cudnn"     cuDNN fused attention: CUDA GPU only, bf16/fp16, head dim a multiple of 8 and <= 256 on Hopper
              and later (sm90+) but <= 128 before (so SD-1.5's head dim 160 is refused on A100). Asking for
              it where it cannot run raises ValueError saying why; "auto" is the portable choice.
  "blockwise" our online-softmax (flash-attention recurrence) attention over query tiles and key blocks,
              in plain jax (lax.map / lax.scan), so it runs on every backend. Memory O(tile * key block)
              instead of O(Tq * Tk), also under autodiff (each tile is rematerialised in the backward pass).
              On CPU it keeps each tile's scores in cache: at SD-1.5's 4096 tokens x 8 heads x 40 it runs
              at about torch's fused SDPA speed (0.9-1.1x) where the XLA path is 4-6x slower.
  "auto"      cudnn where the backend, dtype and head dim allow it; else, on CPU, blockwise from
              CPU_BLOCKWISE_MIN_SCORES scores per head on (all of SD-1.5's attentions but the 8x8 level);
              on GPU/TPU, blockwise only when the XLA score matrix would exceed XLA_MAX_SCORE_BYTES (to bound
              memory), else xla.

Nothing here is GPU-only: every path but an explicit "cudnn" runs on CPU, GPU and TPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise")

# "auto" on CPU: attention with at least this many scores per head (Tq * Tk) uses the blockwise path.
# Measured with scripts/bench/attention.py at SD-1.5 shapes (8 heads, fp32, 2 cores): blockwise/XLA time
# 4096x4096: 0.2-0.3, 1024x1024: 0.3-0.45, 4096x77: 0.6, 256x256: 0.7, 256x77: 1.0, 64x64: 1.4.
CPU_BLOCKWISE_MIN_SCORES = 2 ** 14
# "auto" on accelerators without cuDNN: the XLA score matrix (B*H*Tq*Tk fp32) above this uses blockwise.
XLA_MAX_SCORE_BYTES = 2 ** 30

# Default tiles. CPU: one head at a time, key blocks of up to 1024 and query tiles sized so one fp32
# score tile holds about 2**20 elements (4 MiB: 1024 x 1024 at SD's 64x64 level, all 4096 queries x 77
# text tokens). Measured at 4096 x 4096 x 8 heads x 40 on 2 cores: 1024 x 1024 and 2048 x 512 tiles run at
# 1.05-1.15x torch's SDPA, 512 x 1024 at 1.2x, 128 x 4096 at 1.45x (long rows are slower). Accelerators: all
# heads per step, since every loop step costs kernel launches.
_CPU_TILES = dict(tile_elements=2 ** 20, kv_block=1024, heads_per_step=1)
_ACCEL_TILES = dict(tile_elements=2 ** 22, kv_block=4096, heads_per_step=None)

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf = nan in the recurrence


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
  platform: str  # "cpu", "gpu", "tpu"
  cuda: bool  # an NVIDIA GPU (cuDNN available in principle)
  compute_capability: tuple[int, int] | None


def device_info() -> DeviceInfo:
  """The default device, as the attention policy sees it (tests replace this function)."""
  device = jax.devices()[0]
  cc = getattr(device, "compute_capability", None)
  cuda = device.platform == "gpu" and "cuda" in str(getattr(device.client, "platform_version", "")).lower()
  capability = tuple(int(p) for p in str(cc).split(".")[:2]) if cc else None
  return DeviceInfo(device.platform, cuda, capability)


def cudnn_unsupported_reason(dtype, head_dim: int, info: DeviceInfo | None = None) -> str | None:
  """Why cuDNN fused attention cannot run here for this dtype and head dim (None: it can)."""
  info = device_info() if info is None else info
  if not info.cuda or info.compute_capability is None:
    return f"it needs an NVIDIA CUDA GPU (the default device is {info.platform})"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"it needs bfloat16 or float16 inputs, got {jnp.dtype(dtype).name}"
  limit = 256 if info.compute_capability >= (9, 0) else 128
  if head_dim % 8 or head_dim > limit:
    cc = ".".join(map(str, info.compute_capability))
    return f"head dim {head_dim} is not a multiple of 8 that is <= {limit} (compute capability {cc})"
  return None


def cudnn_supported(dtype, head_dim: int, info: DeviceInfo | None = None) -> bool:
  return cudnn_unsupported_reason(dtype, head_dim, info) is None


def resolve_implementation(implementation: str, dtype, head_dim: int, kv_tokens: int, *,
                           q_tokens: int | None = None, batch_heads: int = 1,
                           info: DeviceInfo | None = None) -> str:
  """The concrete implementation ("xla", "cudnn" or "blockwise") for one attention call."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "xla" or implementation == "blockwise":
    return implementation
  info = device_info() if info is None else info
  reason = cudnn_unsupported_reason(dtype, head_dim, info)
  if implementation == "cudnn":
    if reason is not None:
      raise ValueError(f"attention implementation 'cudnn' cannot run here: {reason}; "
                       "use 'auto' to fall back to the XLA or blockwise path")
    return "cudnn"
  if reason is None:
    return "cudnn"
  scores = (q_tokens or kv_tokens) * kv_tokens
  if info.platform == "cpu":
    return "blockwise" if scores >= CPU_BLOCKWISE_MIN_SCORES else "xla"
  score_bytes = 4 * batch_heads * scores
  return "blockwise" if score_bytes > XLA_MAX_SCORE_BYTES else "xla"


def _tile_size(n: int, target: int) -> int:
  """Tile of at most `target` covering n in ceil(n / target) near-equal tiles (padding < one tile count)."""
  if n <= target:
    return n
  count = -(-n // target)
  return -(-n // count)


def _pad_to(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


@functools.partial(jax.jit, static_argnames=("is_causal", "q_block", "kv_block", "heads_per_step"))
def blockwise_attention(q, k, v, *, is_causal: bool = False, q_block: int | None = None,
                        kv_block: int | None = None, heads_per_step: int | None = 0):
  """softmax(q k^T / sqrt(D)) v one (head, query tile) at a time, online softmax over key blocks.

  Any sequence lengths: the query is padded to whole tiles (padded rows are dropped), the keys to whole
  blocks (padded keys are masked). Scores, running max and denominator are fp32 whatever the input dtype;
  the probabilities meet v in v's dtype with fp32 accumulation. heads_per_step: batch*heads processed per
  loop step (None: all at once; 0 or omitted: the backend's default, see _CPU_TILES / _ACCEL_TILES).
  """
  b, tq, h, d = q.shape
  tk = k.shape[1]
  defaults = _CPU_TILES if jax.default_backend() == "cpu" else _ACCEL_TILES
  kv_block = defaults["kv_block"] if kv_block is None else kv_block
  kb = _tile_size(tk, kv_block)
  q_block = max(64, defaults["tile_elements"] // kb) if q_block is None else q_block
  qb = _tile_size(tq, q_block)
  if heads_per_step == 0:
    heads_per_step = defaults["heads_per_step"]
  nq, nk = -(-tq // qb), -(-tk // kb)
  scale = 1.0 / math.sqrt(d)
  g = b * h
  # (G, nq, qb, D) query tiles; (G, nk, kb, D) key/value blocks.
  qs = _pad_to(q, 1, nq * qb).transpose(0, 2, 1, 3).reshape(g, nq, qb, d)
  ks = _pad_to(k, 1, nk * kb).transpose(0, 2, 1, 3).reshape(g, nk, kb, d)
  vs = _pad_to(v, 1, nk * kb).transpose(0, 2, 1, 3).reshape(g, nk, kb, v.shape[-1])
  padded_keys = nk * kb != tk

  def scores(qi, q_index, kj, k_index):
    s = jnp.einsum("qd,kd->qk", qi, kj, preferred_element_type=jnp.float32)
    if not (padded_keys or is_causal):
      return s
    cols = k_index * kb + jnp.arange(kb)[None, :]
    keep = cols < tk
    if is_causal:
      keep = keep & (cols <= q_index * qb + jnp.arange(qb)[:, None])
    return jnp.where(keep, s, _MASK_VALUE)

  def pv(p, vj):
    return jnp.einsum("qk,kd->qd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)

  @jax.checkpoint
  def tile(qi, q_index, kh, vh):
    """One query tile of one head against all keys of that head."""
    if nk == 1:  # plain softmax, no recurrence
      s = scores(qi, q_index, kh[0], 0)
      p = jnp.exp((s - s.max(axis=-1, keepdims=True)) * scale)
      return (pv(p, vh[0]) / p.sum(axis=-1, keepdims=True)).astype(q.dtype)

    def step(carry, kv):
      acc, row_max, denom = carry
      kj, vj, k_index = kv
      s = scores(qi, q_index, kj, k_index)
      new_max = jnp.maximum(row_max, s.max(axis=-1))
      correction = jnp.exp((row_max - new_max) * scale)
      p = jnp.exp((s - new_max[:, None]) * scale)
      denom = denom * correction + p.sum(axis=-1)
      acc = acc * correction[:, None] + pv(p, vj)
      return (acc, new_max, denom), None

    init = (jnp.zeros((qb, vh.shape[-1]), jnp.float32), jnp.full((qb,), _MASK_VALUE, jnp.float32),
            jnp.zeros((qb,), jnp.float32))
    (acc, _, denom), _ = jax.lax.scan(step, init, (kh, vh, jnp.arange(nk)))
    return (acc / denom[:, None]).astype(q.dtype)

  def head(args):
    qh, kh, vh = args
    if nq == 1:
      return tile(qh[0], 0, kh, vh)[None]
    return jax.lax.map(lambda a: tile(a[0], a[1], kh, vh), (qh, jnp.arange(nq)))

  if heads_per_step is None or heads_per_step >= g:
    out = jax.vmap(head)((qs, ks, vs))
  else:
    out = jax.lax.map(head, (qs, ks, vs), batch_size=heads_per_step if heads_per_step > 1 else None)
  out = out.reshape(b, h, nq * qb, -1)[:, :, :tq].transpose(0, 2, 1, 3)
  return out


def dot_product_attention(q, k, v, *, implementation: str = "auto", upcast: bool = False,
                          is_causal: bool = False):
  """softmax(q k^T / sqrt(D)) v. `upcast` computes in fp32 (diffusers' upcast_attention).

  is_causal: query i attends to keys 0..i only (CLIP's text tower).
  """
  out_dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  impl = resolve_implementation(implementation, q.dtype, q.shape[-1], k.shape[1], q_tokens=q.shape[1],
                                batch_heads=q.shape[0] * q.shape[2])
  if impl == "blockwise":
    out = blockwise_attention(q, k, v, is_causal=is_causal)
  else:
    out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)
  return out.astype(out_dtype)
