"""Prepares the paper's test sets (the StableSR protocol) as paired folders (hr/, lr/, lr_up/, meta.json).

  python scripts/prepare_testsets.py realsr  --root /data/RealSR_V3      --out /data/testsets/RealSR
  python scripts/prepare_testsets.py drealsr --root /data/DRealSR/Test_x4 --out /data/testsets/DRealSR
  python scripts/prepare_testsets.py div2k-val --source folder:/data/DIV2K_valid_HR --out /data/testsets/DIV2K_val

realsr / drealsr: aligned centre crops (LR 128, HR 512) of the real pairs (cassr_jax.data.testsets).
div2k-val: the DIV2K validation HR images degraded with the x4plus pipeline and a fixed seed, whole images
(cassr_jax.data.paired.make_paired_set with crop=0, i.e. scripts/make_paired_data.py --crop 0).
"""
from __future__ import annotations

import argparse
import sys

from cassr_jax.data import cli, paired, presets, testsets


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("set", choices=("realsr", "drealsr", "div2k-val"))
  p.add_argument("--root", help="dataset folder (realsr / drealsr)")
  p.add_argument("--source", help="HR source for div2k-val, e.g. folder:/data/DIV2K_valid_HR or "
                                  "tfds:div2k/bicubic_x4@validation")
  p.add_argument("--out", required=True)
  p.add_argument("--scale", type=int, default=4)
  p.add_argument("--lr-crop", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--preset", default="x4plus", choices=sorted(presets.PRESETS))
  p.add_argument("--workers", type=int, default=0)
  args = p.parse_args(argv)
  if args.set == "div2k-val":
    if not args.source:
      p.error("div2k-val needs --source")
    return cli.run_job(lambda: paired.make_paired_set(args.source, args.out, seed=args.seed, preset=args.preset,
                                                      crop=0, scale=args.scale, workers=args.workers))
  if not args.root:
    p.error(f"{args.set} needs --root")
  return cli.run_job(lambda: testsets.prepare_real_pairs(args.root, args.out, scale=args.scale,
                                                         lr_crop=args.lr_crop, kind=args.set))


if __name__ == "__main__":
  sys.exit(main())
