"""The attention switch: blockwise vs XLA vs a float64 numpy reference, and the "auto" policy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cassr_jax.nn import attention
from cassr_jax.nn.attention import DeviceInfo, blockwise_attention, dot_product_attention, resolve_implementation
from conftest import relative_max_error

CPU = DeviceInfo("cpu", False, None)
A100 = DeviceInfo("gpu", True, (8, 0))
H100 = DeviceInfo("gpu", True, (9, 0))
TPU = DeviceInfo("tpu", False, None)


def reference_attention(q, k, v, is_causal=False):
  """float64 numpy softmax(q k^T / sqrt(d)) v in (B, T, H, D) layout."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if is_causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def qkv(rng, b, tq, tk, h, d, dtype=np.float32, scale=1.0):
  draw = lambda t: (scale * rng.standard_normal((b, t, h, d))).astype(np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (draw(tq), draw(tk), draw(tk)))


# (tq, tk, causal, q_block, kv_block, heads_per_step): odd lengths, several key blocks with a padded last
# block (online recurrence + key mask), padded query tiles, heads batched per step, everything in one step.
CASES = [
    (37, 53, False, None, None, 0),
    (37, 53, False, 8, 16, 0),
    (64, 64, True, 16, 16, 0),
    (50, 77, True, 32, 24, 3),
    (33, 200, False, 16, 64, None),
    (1, 5, False, None, None, 0),
]


@pytest.mark.parametrize("tq,tk,causal,q_block,kv_block,heads_per_step", CASES)
def test_blockwise_matches_reference_and_xla(rng, tq, tk, causal, q_block, kv_block, heads_per_step):
  q, k, v = qkv(rng, 2, tq, tk, 3, 8, scale=2.0)  # scale 2: peaked softmax exercises the running max
  ours = blockwise_attention(q, k, v, is_causal=causal, q_block=q_block, kv_block=kv_block,
                             heads_per_step=heads_per_step)
  xla = dot_product_attention(q, k, v, implementation="xla", is_causal=causal)
  ref = reference_attention(q, k, v, causal)
  assert ours.shape == ref.shape and ours.dtype == jnp.float32
  assert relative_max_error(ours, ref) < 2e-6
  assert relative_max_error(xla, ref) < 2e-6


def test_switch_paths_agree_at_sd_like_shape(rng):
  # One SD-1.5 64x64-latent self-attention head count, at 1/16 the tokens to stay fast.
  q, k, v = qkv(rng, 1, 256, 256, 8, 40)
  ref = reference_attention(q, k, v)
  for impl in ("xla", "blockwise", "auto"):
    assert relative_max_error(dot_product_attention(q, k, v, implementation=impl), ref) < 2e-6, impl


def test_bf16_inputs_and_upcast(rng):
  q, k, v = qkv(rng, 2, 70, 90, 2, 16, dtype=jnp.bfloat16)
  ref = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  for impl in ("xla", "blockwise"):
    out = dot_product_attention(q, k, v, implementation=impl)
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert relative_max_error(out.astype(jnp.float32), ref) < 2e-2, impl
    up = dot_product_attention(q, k, v, implementation=impl, upcast=True)
    assert up.dtype == jnp.bfloat16  # computed in fp32, returned in the input dtype
    # fp32 math: only the final rounding to bf16 remains (half an ulp, 2**-9 relative).
    assert relative_max_error(up.astype(jnp.float32), ref) < 5e-3, impl
  # Blockwise keeps its scores and softmax statistics in fp32 even for bf16 inputs.
  out = blockwise_attention(q, k, v, q_block=16, kv_block=32)
  assert relative_max_error(out.astype(jnp.float32), ref) < 2e-2


def test_blockwise_gradients_match_xla(rng):
  q, k, v = qkv(rng, 1, 45, 61, 2, 8)
  w = jnp.asarray(rng.standard_normal((1, 45, 2, 8)), jnp.float32)

  def loss(impl, **kw):
    if impl == "blockwise":
      f = lambda q, k, v: blockwise_attention(q, k, v, q_block=16, kv_block=16, **kw)
    else:
      f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)

  for causal in (False, True):
    ours, ref = loss("blockwise", is_causal=causal), loss("xla", is_causal=causal)
    for name, a, b in zip("qkv", ours, ref):
      assert relative_max_error(a, b) < 1e-5, (name, causal)


def test_blockwise_bounds_memory():
  # XLA's path holds the 8 x 4096 x 4096 fp32 score matrix (512 MiB); blockwise one query tile of one head
  # at a time: forward ~20 MiB, backward ~70 MiB (a tile's key-block steps are recomputed and kept).
  shape = jax.ShapeDtypeStruct((1, 4096, 8, 40), jnp.float32)

  def temp_bytes(fn):
    return jax.jit(fn).lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

  score_bytes = 8 * 4096 * 4096 * 4
  assert temp_bytes(lambda q, k, v: jax.nn.dot_product_attention(q, k, v)) >= score_bytes
  assert temp_bytes(blockwise_attention) < score_bytes / 16
  grad = jax.grad(lambda q, k, v: blockwise_attention(q, k, v).sum(), argnums=(0, 1, 2))
  assert temp_bytes(grad) < score_bytes / 4


def test_auto_policy_on_cpu():
  auto = lambda q_tokens, kv_tokens, dtype=jnp.float32: resolve_implementation(
      "auto", dtype, 40, kv_tokens, q_tokens=q_tokens, info=CPU)
  assert auto(4096, 4096) == "blockwise"
  assert auto(4096, 77) == "blockwise"  # SD's text cross-attention at 64x64
  assert auto(256, 64, jnp.bfloat16) == "blockwise"  # exactly CPU_BLOCKWISE_MIN_SCORES (2**14)
  assert auto(255, 64) == "xla"
  assert auto(64, 77) == "xla"  # SD's 8x8 level
  assert resolve_implementation("auto", jnp.float32, 40, 77, info=CPU) == "xla"  # q_tokens defaults to kv
  for impl in ("xla", "blockwise"):  # explicit choices are kept
    assert resolve_implementation(impl, jnp.bfloat16, 160, 4096, info=H100) == impl


@pytest.mark.parametrize("info,dtype,head_dim,expected", [
    (H100, jnp.bfloat16, 160, "cudnn"),   # SD-1.5's deepest level on Hopper
    (H100, jnp.float16, 256, "cudnn"),
    (H100, jnp.bfloat16, 264, "xla"),     # above Hopper's 256
    (H100, jnp.bfloat16, 44, "xla"),      # not a multiple of 8
    (H100, jnp.float32, 40, "xla"),       # cuDNN needs half precision
    (A100, jnp.bfloat16, 128, "cudnn"),
    (A100, jnp.bfloat16, 160, "xla"),     # SD-1.5's head dim 160 is not allowed on A100
    (DeviceInfo("gpu", False, None), jnp.bfloat16, 64, "xla"),  # a non-CUDA GPU
    (TPU, jnp.bfloat16, 64, "xla"),
])
def test_auto_policy_on_accelerators(info, dtype, head_dim, expected):
  assert resolve_implementation("auto", dtype, head_dim, 1024, q_tokens=1024, batch_heads=16, info=info) == expected


def test_auto_uses_blockwise_on_accelerators_only_for_huge_score_matrices():
  # 2 x 8 heads x 16384^2 fp32 scores (16 GiB) would not fit: blockwise; 4096 tokens (1 GiB) stays XLA.
  assert resolve_implementation("auto", jnp.float32, 40, 16384, q_tokens=16384, batch_heads=16, info=A100) \
      == "blockwise"
  assert resolve_implementation("auto", jnp.float32, 40, 4096, q_tokens=4096, batch_heads=16, info=A100) == "xla"
  assert resolve_implementation("auto", jnp.bfloat16, 160, 16384, q_tokens=16384, batch_heads=16,
                                info=A100) == "blockwise"


def test_explicit_cudnn_where_it_cannot_run_is_a_clear_error(rng):
  with pytest.raises(ValueError, match="needs an NVIDIA CUDA GPU"):
    resolve_implementation("cudnn", jnp.bfloat16, 64, 77, info=CPU)
  with pytest.raises(ValueError, match="head dim 160 .* <= 128 .*8.0"):
    resolve_implementation("cudnn", jnp.bfloat16, 160, 4096, info=A100)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    resolve_implementation("cudnn", jnp.float32, 64, 77, info=H100)
  with pytest.raises(ValueError, match="must be one of"):
    resolve_implementation("flash", jnp.float32, 64, 77, info=CPU)
  if jax.default_backend() == "cpu":  # the real call, on this machine's device query
    q, k, v = qkv(rng, 1, 8, 8, 1, 8, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="'cudnn' cannot run here"):
      dot_product_attention(q, k, v, implementation="cudnn")


def test_dot_product_attention_routes_by_the_device_query(rng, monkeypatch):
  calls = []
  real = attention.blockwise_attention
  monkeypatch.setattr(attention, "blockwise_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
  q, k, v = qkv(rng, 1, 64, 300, 2, 8)
  ref = reference_attention(q, k, v)
  monkeypatch.setattr(attention, "device_info", lambda: CPU)
  assert relative_max_error(dot_product_attention(q, k, v), ref) < 2e-6
  assert calls == [1]  # 64 x 300 scores per head >= CPU_BLOCKWISE_MIN_SCORES on CPU
  monkeypatch.setattr(attention, "device_info", lambda: A100)
  assert relative_max_error(dot_product_attention(q, k, v), ref) < 2e-6
  assert calls == [1]  # small score matrix on a GPU: XLA
