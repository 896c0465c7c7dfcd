"""Prepares the paper's test sets (the StableSR protocol) as paired folders (hr/, lr/, lr_up/, meta.json).

  python scripts/prepare_testsets.py realsr  --root /data/RealSR_V3      --out /data/testsets/RealSR
  python scripts/prepare_testsets.py drealsr --root /data/DRealSR/Test_x4 --out /data/testsets/DRealSR
  python scripts/prepare_testsets.py div2k-val --source folder:/data/DIV2K_valid_HR --out /data/testsets/DIV2K_val

realsr / drealsr: real captured pairs, centre-cropped to LR 128x128 and HR 512x512. The HR crop is taken at
exactly scale x the LR crop's offset, so the pair stays aligned. Pairs are found by file name anywhere under
--root: HR files end in _HR or _x1, LR files in _LR<scale> or _x<scale> (RealSR V3: Canon_001_HR.png /
Canon_001_LR4.png; DRealSR: test_HR/x_x1.png / test_LR/x_x4.png). Older RealSR versions store the LR at the HR
size; such an LR is first area-downsampled by the scale (a warning says so).
div2k-val: the DIV2K validation HR images degraded with the x4plus pipeline and a fixed seed, not cropped
(whole images trimmed to a multiple of 4); this is scripts/make_paired_data.py with --crop 0.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import sys

import cv2
import numpy as np

from cassr_jax.data import degradations, images, sources

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_paired_data  # noqa: E402  (sibling script)

logger = logging.getLogger("cassr_jax.data")
_HR = re.compile(r"^(?P<base>.+)_(HR|x1)$", re.IGNORECASE)
_LR = re.compile(r"^(?P<base>.+)_(LR|x)(?P<scale>\d+)$", re.IGNORECASE)


def _pair_key(rel_dir: str, base: str) -> str:
  # test_HR/ and test_LR/ (DRealSR) are the same place for pairing purposes.
  parts = [re.sub(r"(?i)(hr|lr)", "XR", p) for p in rel_dir.split(os.sep) if p]
  return "/".join(parts + [base])


def find_pairs(root: str, scale: int) -> list[tuple[str, str, str]]:
  """(name, hr_path, lr_path) of every HR/LR pair under root, sorted by name."""
  hr, lr = {}, {}
  for rel in sources._list_images(root):  # noqa: SLF001 - same listing rules as the folder source
    rel_dir, fname = os.path.split(rel)
    stem = os.path.splitext(fname)[0]
    if (m := _HR.match(stem)) is not None:
      hr[_pair_key(rel_dir, m["base"])] = os.path.join(root, rel)
    elif (m := _LR.match(stem)) is not None and int(m["scale"]) == scale:
      lr[_pair_key(rel_dir, m["base"])] = os.path.join(root, rel)
  keys = sorted(set(hr) & set(lr))
  for k in sorted(set(lr) - set(hr)):
    logger.warning("no HR image for %s", lr[k])
  if not keys:
    raise sources.DataError(f"{root}: no HR/LR x{scale} pairs (expected *_HR / *_LR{scale} or *_x1 / *_x{scale} files)")
  bases = [k.rsplit("/", 1)[-1] for k in keys]
  unique = len(set(bases)) == len(bases)
  names = bases if unique else [re.sub(r"[^\w.-]", "_", k.replace("/", "__")) for k in keys]
  return [(n, hr[k], lr[k]) for n, k in zip(names, keys)]


def center_crop_pair(hr: np.ndarray, lr: np.ndarray, *, scale: int, lr_crop: int, name: str = "pair"):
  """Aligned centre crops: LR lr_crop x lr_crop, HR at scale x the LR offset. Raises ImageError if too small."""
  if hr.shape[:2] == lr.shape[:2] and scale > 1:
    images.warn_once(name + ":same-size", f"{name}: LR has the HR size; area-downsampling it by {scale}")
    lr = cv2.resize(lr, (lr.shape[1] // scale, lr.shape[0] // scale), interpolation=cv2.INTER_AREA)
  lh, lw = lr.shape[:2]
  if lh < lr_crop or lw < lr_crop:
    raise images.ImageError(name, f"LR {lw}x{lh} is smaller than the {lr_crop} crop")
  top, left = (lh - lr_crop) // 2, (lw - lr_crop) // 2
  hc = lr_crop * scale
  if hr.shape[0] < (top * scale + hc) or hr.shape[1] < (left * scale + hc):
    raise images.ImageError(name, f"HR {hr.shape[1]}x{hr.shape[0]} does not cover {scale}x the LR crop "
                                  f"(LR {lw}x{lh})")
  return (np.ascontiguousarray(hr[top * scale:top * scale + hc, left * scale:left * scale + hc]),
          np.ascontiguousarray(lr[top:top + lr_crop, left:left + lr_crop]))


def prepare_real_pairs(root: str, out_dir: str, *, scale: int = 4, lr_crop: int = 128, kind: str = "real") -> dict:
  pairs = find_pairs(root, scale)
  for k in ("hr", "lr", "lr_up"):
    os.makedirs(os.path.join(out_dir, k), exist_ok=True)
  counts = collections.Counter()
  written = []
  for name, hr_path, lr_path in pairs:
    try:
      hr, lr = center_crop_pair(images.read_image(hr_path), images.read_image(lr_path), scale=scale,
                                lr_crop=lr_crop, name=lr_path)
    except images.ImageError as e:
      images.warn_once(str(e.name), str(e))
      counts["skipped"] += 1
      continue
    up = cv2.resize(lr.astype(np.float32) / 255, (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_CUBIC)
    for key, arr in (("hr", hr), ("lr", lr), ("lr_up", degradations.to_uint8(up))):
      images.write_png(os.path.join(out_dir, key, f"{name}.png"), arr)
    counts["written"] += 1
    written.append(name)
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump({"kind": kind, "root": root, "scale": scale, "lr_crop": lr_crop, "hr_crop": lr_crop * scale,
               "count": len(written), "names": written}, f, indent=1)
  return dict(counts)


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
  p.add_argument("--preset", default="x4plus", choices=sorted(degradations.PRESETS))
  p.add_argument("--workers", type=int, default=0)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.set == "div2k-val":
      if not args.source:
        p.error("div2k-val needs --source")
      counts = make_paired_data.make_paired_set(args.source, args.out, seed=args.seed, preset=args.preset, crop=0,
                                                scale=args.scale, workers=args.workers)
    else:
      if not args.root:
        p.error(f"{args.set} needs --root")
      counts = prepare_real_pairs(args.root, args.out, scale=args.scale, lr_crop=args.lr_crop, kind=args.set)
  except (sources.DataError, images.ImageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(counts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
