"""Benchmark: images/s of each JAX metric vs its torch reference on the same machine, at 512x512.

  python scripts/bench/metrics.py [--size 512] [--batch 1] [--repeats 3] [--metrics lpips dists] [--skip-torch]

A pair is a scikit-image photo (tiled/cropped to size x size) and a blurred, noisy copy. Ours: the metric
objects of cassr_jax.eval (jit, fp32; the first call, which loads weights and compiles, is reported apart).
Reference: cassr_jax.eval.torch_reference (the same nets in plain torch, same weights; torch's default
threads). Prints images/s (pairs scored per second) of both, the ratio ours / torch, and the largest
relative difference between the two scores.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from cassr_jax.eval import dists, lpips


def jax_metrics() -> dict:
  """name -> metric object, for every JAX metric this benchmark knows."""
  return {m.name: m for m in (*lpips.METRICS, *dists.METRICS)}


def photo_pair(size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """(pred, gt) float32 (batch, size, size, 3) in [0, 1]: a degraded copy and the photo."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  photo = skimage.data.astronaut().astype(np.float32) / 255.0
  reps = -(-size // min(photo.shape[:2]))
  gt = np.tile(photo, (reps, reps, 1))[:size, :size]
  # 3x3 box blur plus noise: a cheap, deterministic degradation.
  padded = np.pad(gt, ((1, 1), (1, 1), (0, 0)), mode="edge")
  blurred = sum(padded[i:i + size, j:j + size] for i in range(3) for j in range(3)) / 9.0
  noise = np.random.default_rng(0).standard_normal(gt.shape).astype(np.float32)
  pred = np.clip(blurred + 0.03 * noise, 0.0, 1.0)
  return np.repeat(pred[None], batch, 0), np.repeat(gt[None], batch, 0)


def time_calls(fn, repeats: int) -> tuple[float, float, np.ndarray]:
  """(seconds of the first call, median seconds of the next `repeats`, last result)."""
  t0 = time.perf_counter()
  result = np.asarray(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = np.asarray(fn())
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times)) if times else first, result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=512, help="square image size")
  parser.add_argument("--batch", type=int, default=1, help="pairs per call")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
  parser.add_argument("--metrics", nargs="+", default=None, help="metric names (default: all)")
  parser.add_argument("--skip-torch", action="store_true", help="time ours only")
  parser.add_argument("--table-row", action="store_true", help="also print '| ... |' rows (scripts/bench/gpu.sh)")
  args = parser.parse_args()

  available = jax_metrics()
  names = args.metrics or list(available)
  unknown = [n for n in names if n not in available]
  if unknown:
    parser.error(f"unknown metrics {unknown}; known: {sorted(available)}")
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {len(jax.devices())}, "
        f"host CPUs {os.cpu_count()}; {args.batch} pair(s) of {args.size}x{args.size} per call")
  pred, gt = photo_pair(args.size, args.batch)
  header = f"{'metric':<10} {'first call s':>12} {'ours img/s':>11}"
  if not args.skip_torch:
    import torch  # pylint: disable=import-outside-toplevel
    from cassr_jax.eval import torch_reference  # pylint: disable=import-outside-toplevel
    header += f" {'torch img/s':>11} {'ours/torch':>10} {'max rel diff':>12}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  print(header)
  for name in names:
    metric = available[name]
    first, seconds, ours = time_calls(lambda m=metric: m(pred, gt), args.repeats)
    line = f"{name:<10} {first:>12.2f} {args.batch / seconds:>11.3f}"
    if not args.skip_torch:
      reference = torch_reference.reference_metric(name)
      _, torch_seconds, theirs = time_calls(lambda r=reference: torch_reference.score_nhwc(r, pred, gt),
                                            args.repeats)
      rel = float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-12)))
      line += f" {args.batch / torch_seconds:>11.3f} {torch_seconds / seconds:>10.2f} {rel:>12.2e}"
    print(line, flush=True)
    if args.table_row:
      ratio = "" if args.skip_torch else f"{torch_seconds / seconds:.2f}"
      print(f"| metric {name} {args.size}x{args.size}, batch {args.batch} | first call {first:.1f} s | "
            f"{args.batch / seconds:.2f} | | | | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
