"""Comparison grids and the HTML page, checked in headless Chromium (Debian's `chromium` package)."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_evaluate import test_metrics  # noqa: F401  (fixture registering the t_* test metrics)

from cassr_jax.data import images
from cassr_jax.eval import compare
from cassr_jax.eval import run as run_lib

CHROMIUM = "/usr/bin/chromium"
COLOURS = {"lq": (0, 0, 200), "ref": (0, 160, 0), "pred": (200, 200, 0), "gt": (120, 0, 160)}


def test_pick_box_finds_texture():
  hr = np.full((64, 96, 3), 128, np.uint8)
  hr[40:56, 8:24] = np.indices((16, 16)).sum(0)[..., None] % 2 * 255  # a checkerboard patch
  box = compare.pick_box(hr, 16)
  assert (box.top, box.left, box.size) == (40, 8, 16)
  flat = compare.pick_box(np.zeros((64, 96, 3), np.uint8))
  assert (flat.top, flat.left, flat.size) == (24, 40, 16)


def test_grid_layout_box_and_zoom():
  h, w, pw = 32, 64, 128
  panels = [(k, np.broadcast_to(np.array(c, np.uint8), (h, w, 3)).copy()) for k, c in COLOURS.items()]
  white = (255, 255, 255)
  for _, image in panels:
    image[8:16, 40:48] = white  # the crop window is white in every panel
  grid = compare.comparison_grid(panels, box=compare.Box(8, 40, 8), panel_width=pw)
  view_h = h * pw // w
  assert grid.shape == (compare.LABEL_HEIGHT + view_h + compare.MARGIN + pw + 2 * compare.MARGIN,
                        4 * pw + 5 * compare.MARGIN, 3)
  for i, colour in enumerate(COLOURS.values()):
    x = compare.MARGIN + i * (pw + compare.MARGIN)
    view = grid[compare.LABEL_HEIGHT:compare.LABEL_HEIGHT + view_h, x:x + pw]
    assert tuple(view[2, 2]) == colour  # full view, away from the box
    # The box outline (red) is drawn around the crop at scale 2: x 80..95, y 16..31 of the view.
    assert tuple(view[16, 85]) == compare.BOX and tuple(view[24, 80]) == compare.BOX
    assert tuple(view[24, 88]) == white
    zoom_y = compare.LABEL_HEIGHT + view_h + compare.MARGIN
    zoom = grid[zoom_y:zoom_y + pw, x:x + pw]
    assert (zoom == 255).all()  # the enlarged crop is the white window only
    # The label is drawn in dark (antialiased) text in the label strip of every column.
    assert (grid[:compare.LABEL_HEIGHT, x:x + pw] < 100).all(-1).sum() > 10


def _make_run(tmp_path, rng, n=3, size=(48, 64), metrics="musiq"):
  for d in ("pred", "gt", "lq", "ref"):
    os.makedirs(tmp_path / d)
  for i in range(n):
    name = f"photo {i}#"  # a space and '#' must survive the relative URL
    gt = np.broadcast_to(np.array(COLOURS["gt"], np.uint8), (*size, 3)).copy()
    gt[10:30, 10:30] = rng.integers(0, 256, (20, 20, 3))
    images.write_png(tmp_path / "gt" / f"{name}.png", gt)
    images.write_png(tmp_path / "pred" / f"{name}.png", np.broadcast_to(np.array(COLOURS["pred"], np.uint8),
                                                                         (*size, 3)))
    images.write_png(tmp_path / "ref" / f"{name}.png", np.broadcast_to(np.array(COLOURS["ref"], np.uint8),
                                                                        (*size, 3)))
    images.write_png(tmp_path / "lq" / f"{name}.png", np.broadcast_to(np.array(COLOURS["lq"], np.uint8),
                                                                       (size[0] // 4, size[1] // 4, 3)))
  return run_lib.run_evaluation(tmp_path / "pred", tmp_path / "gt", tmp_path / "run", lq_dir=tmp_path / "lq",
                                     ref_dir=tmp_path / "ref", metrics=metrics, panel_width=96, title="Tiny run",
                                     backends=("jax",))


def test_page_links_are_relative_and_shows_metrics(tmp_path, rng, test_metrics):  # noqa: F811
  outputs = _make_run(tmp_path, rng, metrics="t_mse,musiq")
  page = pathlib.Path(outputs.files["html"]).read_text(encoding="utf-8")
  srcs = re.findall(r'<img src="([^"]+)"', page)
  assert srcs == [f"grids/photo%20{i}%23.png" for i in range(3)]
  assert "<script" not in page and "http" not in page and str(tmp_path / "run") not in page.split("</h1>")[1]
  grid = np.asarray(Image.open(outputs.grids["photo 0#"]))
  assert grid.shape[1] == 4 * 96 + 5 * compare.MARGIN  # LR | reference | CasSR | HR
  assert page.count("unavailable") == 1  # once, in the summary (MUSIQ)
  sections = page.split("<section")[1:]
  for i, section in enumerate(sections):
    value = outputs.result.per_image[f"photo {i}#"]["t_mse"]
    assert f"<td class=num>{value:.4f}</td>" in section and "MUSIQ" not in section


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")
def test_page_renders_its_images_in_chromium(tmp_path, rng):
  outputs = _make_run(tmp_path, rng)
  page = pathlib.Path(outputs.files["html"]).read_text(encoding="utf-8")
  # A copy of the page next to it (same relative links) with a probe writing each image's natural size
  # into the DOM after load; a missing or broken image has naturalWidth 0.
  probe = ("<script>window.addEventListener('load', () => { const out = document.createElement('pre');"
           "out.id = 'probe'; out.textContent = Array.from(document.images).map("
           "i => i.complete + ':' + i.naturalWidth + 'x' + i.naturalHeight).join(' ');"
           "document.body.appendChild(out); });</script></body>")
  probe_path = tmp_path / "run" / "probe.html"
  probe_path.write_text(page.replace("</body>", probe), encoding="utf-8")
  profile = tmp_path / "profile"
  cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", "--dump-dom", probe_path.as_uri()]
  done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  found = re.search(r'<pre id="probe">([^<]*)</pre>', done.stdout)
  assert found, done.stdout[-2000:]
  w, h = Image.open(outputs.grids["photo 0#"]).size
  assert found.group(1).split() == [f"true:{w}x{h}"] * 3
  # And a broken link is detected by the same probe (the check can fail).
  os.remove(outputs.grids["photo 1#"])
  done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
  found = re.search(r'<pre id="probe">([^<]*)</pre>', done.stdout)
  assert found.group(1).split()[1].endswith(":0x0")
  shutil.rmtree(profile, ignore_errors=True)
