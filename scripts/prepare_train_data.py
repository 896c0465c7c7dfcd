"""Cuts downloaded HR training folders into overlapping tiles (BasicSR-style sub-images) for fast decoding.

  python scripts/prepare_train_data.py --out /data/cassr_train \
      --input DIV2K=/data/DIV2K_train_HR --input DIV8K=/data/DIV8K --input Flickr2K=/data/Flickr2K_HR \
      --input OST=/data/OST --input FFHQ=/data/ffhq/images1024x1024 --limit FFHQ=10000 --workers 8

That is the paper's mixture; train on it with config.data = pipeline.paper_data_config('/data/cassr_train').
Defaults: 512 crops, step 256, thresh_size 0, PNG compression 1 (cassr_jax.data.tiles explains each).
Resumable (rerun the same command); bad files are reported and skipped. Prints the counts as JSON.
"""
from __future__ import annotations

import argparse
import sys

from cassr_jax.data import cli, sources, tiles


def _pairs(values: list[str], what: str) -> dict[str, str]:
  out = {}
  for v in values:
    name, sep, rest = v.partition("=")
    if not sep or not name or not rest:
      raise sources.DataError(f"{what} {v!r}: expected NAME=VALUE")
    out[name] = rest
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", action="append", required=True, help="NAME=FOLDER (repeatable)")
  p.add_argument("--limit", action="append", default=[], help="NAME=N: only the first N images (sorted paths)")
  p.add_argument("--out", required=True)
  p.add_argument("--crop", type=int, default=512)
  p.add_argument("--step", type=int, default=256)
  p.add_argument("--thresh-size", type=int, default=0)
  p.add_argument("--png-compression", type=int, default=1)
  p.add_argument("--workers", type=int, default=0)
  args = p.parse_args(argv)

  def job():
    inputs = _pairs(args.input, "--input")
    limits = _pairs(args.limit, "--limit")
    bad = [f"{k}={v}" for k, v in limits.items() if not v.isdigit()]
    if bad:
      raise sources.DataError(f"--limit {bad}: N must be a whole number")
    limits = {k: int(v) for k, v in limits.items()}
    settings = tiles.TileSettings(args.crop, args.step, args.thresh_size, args.png_compression)
    return tiles.extract_tiles(inputs, args.out, settings=settings, limits=limits, workers=args.workers)

  return cli.run_job(job)


if __name__ == "__main__":
  sys.exit(main())
