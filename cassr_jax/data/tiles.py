"""Training sub-images: BasicSR-style extraction of downloaded HR folders into overlapping tiles.

Decoding a 2K PNG costs more than degrading a 512 crop, so the training folders are cut once into tiles
(BasicSR's scripts/extract_subimages.py rule): along each side, starts 0, step, 2*step, ... while a whole
crop fits, plus one crop flush with the far edge when more than `thresh_size` pixels would be left over.
A side shorter than the crop gives one tile of that side's full length (the pipeline pads or skips it).

Tiles are stored as lossless PNG, compression level 1 by default (half the disk of level 0). Measured on a
512x512 photo tile, one core of a loaded shared machine, cv2 decode (images.decode_image adds ~0.5 ms):
PNG level 0 770 KiB 5.4 ms, level 1 385 KiB 11 ms, level 3 370 KiB 11 ms, lossless WebP 256 KiB 8.6 ms
(but 240 ms to encode), JPEG q95 78 KiB 2.2 ms (lossy: it would add its own artifacts to the target); a
2040x1356 DIV2K-sized PNG takes ~90 ms. Level 0 is the choice when disk is plentiful (--png-compression 0).

Layout: <out>/<name>/<source stem>_s<NNN>.png per dataset `name`, and <out>/meta.json (settings, counts,
skipped files). Resumable: an image whose tiles all exist is skipped; every tile is written atomically.
Unreadable or damaged files are reported (one warning each, listed in meta.json) and skipped.

The paper's mixture (PAPER_TRAIN_SETS): DIV2K, DIV8K, Flickr2K, OST and the first 10K images of FFHQ;
`paper_sources(out)` gives the matching config.data.sources string (with config.data.mix = 'size', every tile
is equally likely, as in one concatenated folder).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import time

from cassr_jax.data import images, sources

logger = logging.getLogger("cassr_jax.data")

# (dataset name, how many images of it; None = all), in the paper's order.
PAPER_TRAIN_SETS = (("DIV2K", None), ("DIV8K", None), ("Flickr2K", None), ("OST", None), ("FFHQ", 10_000))


@dataclasses.dataclass(frozen=True)
class TileSettings:
  crop: int = 512
  step: int = 256
  thresh_size: int = 0
  png_compression: int = 1

  def __post_init__(self):
    if self.crop < 1 or self.step < 1 or self.thresh_size < 0:
      raise sources.DataError(f"tiles: crop={self.crop}, step={self.step} must be >= 1 and "
                              f"thresh_size={self.thresh_size} >= 0")
    if not 0 <= self.png_compression <= 9:
      raise sources.DataError(f"tiles: png_compression={self.png_compression} must be in 0..9")


def subimage_starts(size: int, crop: int, step: int, thresh_size: int) -> list[int]:
  """BasicSR's tile starts along one side (see the module docstring)."""
  if size <= crop:
    return [0]
  starts = list(range(0, size - crop + 1, step))
  if size - (starts[-1] + crop) > thresh_size:
    starts.append(size - crop)
  return starts


def tile_boxes(height: int, width: int, s: TileSettings) -> list[tuple[int, int, int, int]]:
  """(top, left, tile height, tile width) of every tile of an image, in raster order."""
  th, tw = min(height, s.crop), min(width, s.crop)
  return [(t, l, th, tw) for t in subimage_starts(height, s.crop, s.step, s.thresh_size)
          for l in subimage_starts(width, s.crop, s.step, s.thresh_size)]


def _tile_path(out_dir: str, stem: str, k: int) -> str:
  return os.path.join(out_dir, f"{stem}_s{k:03d}.png")


class _ImageTiler:
  """Cuts one source image into tiles (picklable, for process pools). Returns (written, kept, error)."""

  def __init__(self, root: str, out_dir: str, settings: TileSettings, max_pixels: int):
    self.root, self.out_dir, self.settings, self.max_pixels = root, out_dir, settings, max_pixels

  def __call__(self, rel: str) -> tuple[int, int, str | None]:
    images.use_one_core()
    path = os.path.join(self.root, rel)
    stem = sources.safe_stem(rel)
    try:
      info = images.probe_image(path, path, max_pixels=self.max_pixels)
      boxes = tile_boxes(info.height, info.width, self.settings)
      if all(os.path.exists(_tile_path(self.out_dir, stem, k)) for k in range(len(boxes))):
        return 0, len(boxes), None
      img = images.read_image(path, max_pixels=self.max_pixels)
    except images.ImageError as e:
      return 0, 0, str(e)
    written = 0
    for k, (t, l, th, tw) in enumerate(boxes):
      target = _tile_path(self.out_dir, stem, k)
      if not os.path.exists(target):
        images.write_png(target, img[t:t + th, l:l + tw], self.settings.png_compression)
        written += 1
    return written, len(boxes) - written, None


def extract_tiles(inputs: dict[str, str] | list[tuple[str, str]], out_root: str, *,
                  settings: TileSettings = TileSettings(), limits: dict[str, int] | None = None,
                  workers: int = 0, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> dict:
  """Cuts each input folder (name -> path) into tiles under out_root/name; returns the counts per name.

  `limits[name] = n` keeps only the first n images of a folder in sorted path order (FFHQ: 10000).
  """
  inputs = list(inputs.items()) if isinstance(inputs, dict) else list(inputs)
  limits = dict(limits or {})
  unknown = set(limits) - {n for n, _ in inputs}
  if unknown:
    raise sources.DataError(f"tiles: limits for unknown inputs {sorted(unknown)}")
  for name, _ in inputs:
    if not re.fullmatch(r"[\w.-]+", name):
      raise sources.DataError(f"tiles: input name {name!r} must be a plain folder name")
  os.makedirs(out_root, exist_ok=True)
  meta_path = os.path.join(out_root, "meta.json")
  meta = {}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    old = meta.get("settings")
    if old is not None and old != dataclasses.asdict(settings):
      raise sources.DataError(f"{out_root} holds tiles made with other settings {old}; use a new output folder")
  meta["settings"] = dataclasses.asdict(settings)
  meta.setdefault("datasets", {})
  results = {}
  for name, root in inputs:
    files = sources.list_images(root)
    if limits.get(name) is not None:
      files = files[:int(limits[name])]
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    images.remove_stale_temporaries(out_dir)
    tiler = _ImageTiler(root, out_dir, settings, max_pixels)
    counts = {"images": len(files), "tiles_written": 0, "tiles_kept": 0, "skipped": 0}
    bad: list[str] = []
    t0 = time.time()

    if workers > 0:
      ctx = multiprocessing.get_context("spawn")
      pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
      results_iter = pool.map(tiler, files, chunksize=4)
    else:
      pool, results_iter = None, map(tiler, files)
    try:
      for i, (rel, (written, kept, error)) in enumerate(zip(files, results_iter)):
        counts["tiles_written"] += written
        counts["tiles_kept"] += kept
        if error is not None:
          counts["skipped"] += 1
          bad.append(rel)
          images.warn_once(os.path.join(root, rel), error)
        if (i + 1) % 200 == 0:
          logger.info("%s: %d/%d images (%.0f s)", name, i + 1, len(files), time.time() - t0)
    finally:
      if pool is not None:
        pool.shutdown()
    counts["tiles"] = counts["tiles_written"] + counts["tiles_kept"]
    results[name] = counts
    meta["datasets"][name] = {"source": os.path.abspath(root), "limit": limits.get(name), "images": len(files),
                              "tiles": counts["tiles"], "skipped": sorted(bad)}
    images.write_json(meta_path, meta)
  return results


def paper_sources(tiles_root: str) -> str:
  """config.data.sources for the paper's mixture, as written by extract_tiles under tiles_root."""
  return ",".join(f"folder:{os.path.join(tiles_root, name)}" for name, _ in PAPER_TRAIN_SETS)
