"""Micro-benchmark: our attention implementations vs torch's fused SDPA at SD-1.5 shapes (CPU or GPU).

  python scripts/bench/attention.py                      # the SD-1.5 self-attention shapes, fp32
  python scripts/bench/attention.py --tokens 4096 --heads 8 --head-dim 40 --kv-tokens 77

Runs are interleaved (ours, torch, ours, ...) so background load hits both alike; prints medians.
Measured (2 cores, fp32, quiet machine): blockwise vs torch SDPA 1.05-1.15x at 4096 x 4096 x 40 and
1.3-1.7x at 1024 x 1024 x 80; the XLA path 4-7x. Timings on this shared VM scatter by +-20%, and a shape's
first timings after a large XLA-path run are inflated (run one shape per process with --tokens to be sure).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cassr_jax.nn import attention


def _time(fn, runs: int) -> list[float]:
  out = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def bench_shape(tokens: int, kv_tokens: int, heads: int, head_dim: int, impls, runs: int, dtype: str,
                blocks=None):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((1, tokens, heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((1, kv_tokens, heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((1, kv_tokens, heads, head_dim)).astype(np.float32)
  jdt = jnp.dtype(dtype)
  jq, jk, jv = (jnp.asarray(x, jdt) for x in (q, k, v))
  fns = {}
  for impl in impls:
    if impl == "blockwise" and blocks:
      for qb, kb in blocks:
        f = jax.jit(lambda a, b, c, qb=qb, kb=kb: attention.blockwise_attention(a, b, c, q_block=qb, kv_block=kb))
        fns[f"blockwise[{qb},{kb}]"] = f
    else:
      fns[impl] = jax.jit(lambda a, b, c, impl=impl: attention.dot_product_attention(a, b, c, implementation=impl))
  compiled = {}
  for name, f in sorted(fns.items(), key=lambda item: item[0] == "xla"):
    t0 = time.perf_counter()
    f(jq, jk, jv).block_until_ready()
    compiled[name] = time.perf_counter() - t0
  times = {name: [] for name in fns}
  torch_fn = None
  try:
    import torch
    tq, tk, tv = (torch.from_numpy(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    if dtype == "bfloat16":
      tq, tk, tv = (x.bfloat16() for x in (tq, tk, tv))

    def torch_fn():
      with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    torch_fn()
    times["torch_sdpa"] = []
  except ImportError:
    pass
  # Interleaved, except the XLA path: timed afterwards, since running it (hundreds of MiB of scores)
  # slows whatever runs next in this process by up to 1.5x, even after a cache flush.
  for _ in range(runs):
    for name, f in fns.items():
      if name != "xla":
        times[name] += _time(lambda f=f: f(jq, jk, jv).block_until_ready(), 1)
    if torch_fn is not None:
      times["torch_sdpa"] += _time(torch_fn, 1)
  if "xla" in fns:
    times["xla"] = _time(lambda: fns["xla"](jq, jk, jv).block_until_ready(), runs)
  print(f"q {tokens} x kv {kv_tokens} x {heads} heads x {head_dim} ({dtype}), {runs} runs, medians:")
  ref = statistics.median(times["torch_sdpa"]) if "torch_sdpa" in times else None
  for name, t in times.items():
    med = statistics.median(t)
    extra = f"  {med / ref:5.2f}x torch" if ref else ""
    comp = f"  (compile {compiled[name]:.2f} s)" if name in compiled else ""
    print(f"  {name:24s} {med * 1e3:9.1f} ms{extra}{comp}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=None)
  p.add_argument("--kv-tokens", type=int, default=None)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=None)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--impls", default="xla,blockwise")
  p.add_argument("--blocks", default="", help="blockwise sweep, e.g. '256x4096,512x1024'")
  args = p.parse_args()
  impls = args.impls.split(",")
  blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",") if b]
  if args.tokens is not None:
    shapes = [(args.tokens, args.kv_tokens or args.tokens, args.head_dim or 40)]
  else:  # SD-1.5 at a 64x64 latent: self-attention at each resolution
    shapes = [(4096, 4096, 40), (1024, 1024, 80), (256, 256, 160), (64, 64, 160)]
  for tq, tk, d in shapes:
    bench_shape(tq, tk, args.heads, d, impls, args.runs, args.dtype, blocks)


if __name__ == "__main__":
  main()
