"""The paper's test sets (the StableSR protocol) as paired folders (hr/, lr/, lr_up/, meta.json).

realsr / drealsr (`prepare_real_pairs`): real captured pairs, centre-cropped to LR 128x128 and HR 512x512. The
HR crop is taken at exactly scale x the LR crop's offset, so the pair stays aligned. Pairs are found by file
name anywhere under the root: HR files end in _HR or _x1, LR files in _LR<scale> or _x<scale> (RealSR V3:
Canon_001_HR.png / Canon_001_LR4.png; DRealSR: test_HR/x_x1.png / test_LR/x_x4.png). Older RealSR versions
store the LR at the HR size; such an LR is first area-downsampled by the scale (a warning says so).
div2k-val: the DIV2K validation HR images degraded with the x4plus pipeline and a fixed seed, whole images
(cassr_jax.data.paired.make_paired_set with crop=0). CLI: scripts/prepare_testsets.py.
"""
from __future__ import annotations

import collections
import logging
import os
import re

import cv2
import numpy as np

from cassr_jax.data import images, sources
from cassr_jax.image_ops import to_uint8

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
  for rel in sources.list_images(root):  # the folder source's listing rules
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
  """Writes the aligned centre crops of every pair under root; returns counts {'written', 'skipped'}."""
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
    for key, arr in (("hr", hr), ("lr", lr), ("lr_up", to_uint8(up))):
      images.write_png(os.path.join(out_dir, key, f"{name}.png"), arr)
    counts["written"] += 1
    written.append(name)
  images.write_json(os.path.join(out_dir, "meta.json"),
              {"kind": kind, "root": root, "scale": scale, "lr_crop": lr_crop, "hr_crop": lr_crop * scale,
               "count": len(written), "names": written})
  return dict(counts)
