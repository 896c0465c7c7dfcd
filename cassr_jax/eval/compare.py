"""Comparison pictures: LR (upsampled) | reference | CasSR | HR side by side, with one zoomed crop.

Each column shows the full image (scaled to `panel_width`) with the crop marked by a box, and below it the
same crop enlarged to the panel width, so details can be compared at a glance. The crop is the same
HR-coordinate window in every column; by default it is the most textured window of the HR image (largest
gradient energy), where super-resolvers differ most.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cassr_jax.data import images

from cassr_jax.eval.results import ImagePair

logger = logging.getLogger("cassr_jax.eval")

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
BOX = (255, 0, 0)
LABEL_HEIGHT = 18
MARGIN = 8
_RESAMPLE = {"nearest": cv2.INTER_NEAREST, "bicubic": cv2.INTER_CUBIC}


@dataclasses.dataclass(frozen=True)
class Box:
  """A square crop window in HR pixel coordinates."""
  top: int
  left: int
  size: int


def upsample(image: np.ndarray, size: tuple[int, int], resample: str = "nearest") -> np.ndarray:
  """(h, w, 3) uint8 -> (H, W, 3) at size=(H, W) with nearest or bicubic interpolation."""
  if resample not in _RESAMPLE:
    raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
  if image.shape[:2] == tuple(size):
    return image
  return cv2.resize(image, (size[1], size[0]), interpolation=_RESAMPLE[resample])


def pick_box(hr: np.ndarray, size: int | None = None) -> Box:
  """The size x size window (default: a quarter of the short side, at least 8) of largest gradient energy."""
  h, w = hr.shape[:2]
  size = int(min(h, w, size if size is not None else max(8, min(h, w) // 4)))
  gray = hr.astype(np.float32).mean(axis=-1)
  energy = np.zeros_like(gray)
  energy[:, 1:] += np.abs(np.diff(gray, axis=1))
  energy[1:, :] += np.abs(np.diff(gray, axis=0))
  integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  sums = (integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size])
  # argmax takes the first maximum, so a flat image gives the top-left window; prefer the centre then.
  if np.ptp(sums) == 0:
    return Box((h - size) // 2, (w - size) // 2, size)
  top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
  return Box(int(top), int(left), size)


def comparison_grid(panels: Sequence[tuple[str, np.ndarray]], *, box: Box | None = None, panel_width: int = 384,
                    box_color: tuple[int, int, int] = BOX) -> np.ndarray:
  """uint8 RGB grid of labelled columns (label, full view with the box, enlarged crop). All panels must
  already have the HR size; `box` defaults to pick_box of the last panel (the HR)."""
  if not panels:
    raise ValueError("no panels")
  h, w = panels[0][1].shape[:2]
  for label, image in panels:
    if image.shape[:2] != (h, w):
      raise ValueError(f"panel {label!r} is {image.shape[1]}x{image.shape[0]}, expected {w}x{h}")
  box = box or pick_box(panels[-1][1])
  if box.top < 0 or box.left < 0 or box.top + box.size > h or box.left + box.size > w or box.size < 1:
    raise ValueError(f"crop box {box} is outside the {w}x{h} image")
  scale = panel_width / w
  view_h = max(1, round(h * scale))
  line = max(1, panel_width // 128)
  width = len(panels) * panel_width + (len(panels) + 1) * MARGIN
  height = LABEL_HEIGHT + view_h + MARGIN + panel_width + 2 * MARGIN
  canvas = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  for i, (label, image) in enumerate(panels):
    x = MARGIN + i * (panel_width + MARGIN)
    draw.text((x, MARGIN // 2), label, fill=TEXT, font=font)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    view = cv2.resize(np.ascontiguousarray(image), (panel_width, view_h), interpolation=interp)
    y0 = LABEL_HEIGHT
    canvas.paste(Image.fromarray(view), (x, y0))
    bx0, by0 = x + round(box.left * scale), y0 + round(box.top * scale)
    # At least 2 * line + 1 pixels wide so a tiny crop of a big image still shows as a box.
    bx1 = x + max(round((box.left + box.size) * scale) - 1, round(box.left * scale) + 2 * line)
    by1 = y0 + max(round((box.top + box.size) * scale) - 1, round(box.top * scale) + 2 * line)
    draw.rectangle((bx0, by0, bx1, by1), outline=box_color, width=line)
    crop = image[box.top:box.top + box.size, box.left:box.left + box.size]
    zoom = cv2.resize(np.ascontiguousarray(crop), (panel_width, panel_width), interpolation=cv2.INTER_NEAREST)
    canvas.paste(Image.fromarray(zoom), (x, y0 + view_h + MARGIN))
  return np.asarray(canvas)


def grid_for_pair(pair: ImagePair, *, pred_label: str = "CasSR", ref_label: str = "Reference",
                  lr_resample: str = "nearest", panel_width: int = 384, box: Box | None = None) -> np.ndarray:
  """The grid of one evaluated pair: LR (if pair.lq) | reference (if pair.ref) | result | HR."""
  gt = images.read_image(pair.gt)
  size = gt.shape[:2]
  panels = []
  if pair.lq is not None:
    lq = images.read_image(pair.lq)
    panels.append((f"LR x{size[0] / lq.shape[0]:.3g} ({lr_resample})", upsample(lq, size, lr_resample)))
  if pair.ref is not None:
    panels.append((ref_label, upsample(images.read_image(pair.ref), size, "bicubic")))
  panels += [(pred_label, images.read_image(pair.pred)), ("HR", gt)]
  return comparison_grid(panels, box=box, panel_width=panel_width)


def write_grids(pairs: Sequence[ImagePair], out_dir: str | os.PathLike, **grid_options) -> dict[str, str]:
  """<out_dir>/<name>.png per pair (atomic); a pair whose files cannot be read is logged and skipped."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for pair in pairs:
    try:
      grid = grid_for_pair(pair, **grid_options)
    except (images.ImageError, ValueError) as e:
      logger.error("no comparison grid for %s: %s", pair.name, e)
      continue
    path = os.path.join(out_dir, f"{pair.name}.png")
    images.write_png(path, grid)
    written[pair.name] = path
  return written
