"""Training tiles (cassr_jax.data.tiles, scripts/prepare_train_data.py) and the paper's data mixture."""
import json
import os
import runpy

import numpy as np
import pytest

from cassr_jax.data import images, pipeline, sources, tiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
prepare_main = runpy.run_path(os.path.join(ROOT, "scripts", "prepare_train_data.py"))["main"]


def test_subimage_starts_follow_basicsr():
  assert tiles.subimage_starts(1356, 512, 256, 0) == [0, 256, 512, 768, 844]  # 76 px left: one flush tile
  assert tiles.subimage_starts(1356, 512, 256, 100) == [0, 256, 512, 768]  # <= thresh_size: dropped
  assert tiles.subimage_starts(1280, 512, 256, 0) == [0, 256, 512, 768]  # exact fit
  assert tiles.subimage_starts(300, 512, 256, 0) == [0]  # shorter than the crop: one full-length tile
  boxes = tiles.tile_boxes(300, 700, tiles.TileSettings(crop=256, step=128))
  assert boxes == [(t, l, 256, 256) for t in (0, 44) for l in (0, 128, 256, 384, 444)]
  with pytest.raises(sources.DataError, match="step"):
    tiles.TileSettings(step=0)


@pytest.fixture()
def folders(tmp_path):
  from skimage import data
  a, b = tmp_path / "A", tmp_path / "B" / "sub"
  b.mkdir(parents=True)
  a.mkdir()
  imgs = {"A/x.png": np.ascontiguousarray(data.astronaut()[:200, :330]),
          "B/sub/y.png": np.ascontiguousarray(data.coffee()[:150, :90])}  # narrower than the crop
  for rel, img in imgs.items():
    images.write_png(str(tmp_path / rel), img)
  (tmp_path / "A" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  (tmp_path / "A" / "empty.jpg").write_bytes(b"")
  return tmp_path, imgs


def test_extract_tiles_lossless_resumable_and_reports_bad_files(folders):
  root, imgs = folders
  out = str(root / "tiles")
  s = tiles.TileSettings(crop=128, step=64)
  counts = tiles.extract_tiles({"A": str(root / "A"), "B": str(root / "B")}, out, settings=s)
  na = len(tiles.tile_boxes(200, 330, s))
  assert counts["A"] == {"images": 3, "tiles_written": na, "tiles_kept": 0, "skipped": 2, "tiles": na}
  assert counts["B"]["tiles"] == len(tiles.tile_boxes(150, 90, s)) == 2
  for k, (t, l, th, tw) in enumerate(tiles.tile_boxes(200, 330, s)):
    tile = images.read_image(os.path.join(out, "A", f"x_s{k:03d}.png"))
    np.testing.assert_array_equal(tile, imgs["A/x.png"][t:t + th, l:l + tw])  # lossless, BasicSR boxes
  assert images.read_image(os.path.join(out, "B", "sub__y_s001.png")).shape == (128, 90, 3)
  with open(os.path.join(out, "meta.json")) as f:
    meta = json.load(f)
  assert meta["datasets"]["A"]["skipped"] == ["broken.png", "empty.jpg"] and meta["settings"]["crop"] == 128
  # Resume: a lost tile and a stray temporary; only the lost tile is written again.
  os.remove(os.path.join(out, "A", "x_s002.png"))
  (root / "tiles" / "A" / "x_s003.png.tmp77").write_bytes(b"partial")
  kept = os.stat(os.path.join(out, "A", "x_s000.png")).st_mtime_ns
  again = tiles.extract_tiles({"A": str(root / "A")}, out, settings=s)
  assert again["A"]["tiles_written"] == 1 and again["A"]["tiles_kept"] == na - 1
  assert os.stat(os.path.join(out, "A", "x_s000.png")).st_mtime_ns == kept
  assert not any(f.endswith(".tmp77") for f in os.listdir(os.path.join(out, "A")))
  with pytest.raises(sources.DataError, match="other settings"):
    tiles.extract_tiles({"A": str(root / "A")}, out, settings=tiles.TileSettings(crop=96, step=64))
  # limit: the first N images in sorted order (FFHQ's first 10K).
  lim = tiles.extract_tiles({"A": str(root / "A")}, str(root / "lim"), settings=s, limits={"A": 1})
  assert lim["A"]["images"] == 1 and lim["A"]["skipped"] == 1  # broken.png sorts first


def test_cli_and_the_paper_mixture(folders, capsys):
  root, _ = folders
  out = str(root / "cli")
  assert prepare_main(["--input", f"A={root / 'A'}", "--input", f"B={root / 'B'}", "--out", out,
                       "--crop", "64", "--step", "64", "--workers", "2"]) == 0
  counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert counts["A"]["tiles"] == 4 * 6 and counts["B"]["tiles"] == 3 * 2
  assert prepare_main(["--input", "nofolder", "--out", out]) == 2
  assert "expected NAME=VALUE" in capsys.readouterr().err
  # The paper's mixture: five folders, every tile equally likely (weights proportional to the tile counts).
  c = pipeline.paper_data_config("/data/tiles")
  assert [s.path for s in sources.parse_sources(c.sources)] == [
      os.path.join("/data/tiles", n) for n in ("DIV2K", "DIV8K", "Flickr2K", "OST", "FFHQ")]
  assert c.mix == "size" and dict(tiles.PAPER_TRAIN_SETS)["FFHQ"] == 10_000
  c.sources, c.crop_size = f"folder:{out}/A,folder:{out}/B", 64
  _, weights, _ = pipeline.build_sources(c)
  assert weights == [24.0, 6.0]
  c.mix = "weights"
  assert pipeline.build_sources(c)[1] == [1.0, 1.0]
