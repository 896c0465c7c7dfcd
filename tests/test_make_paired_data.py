"""Paired sets (cassr_jax.data.paired, scripts/make_paired_data.py) and test sets (cassr_jax.data.testsets,
scripts/prepare_testsets.py)."""
import json
import os
import runpy

import cv2
import numpy as np
import pytest

from cassr_jax.data import images, paired, pipeline, sources, testsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CLIs, loaded from their files (scripts/ is not a package).
make_paired_main = runpy.run_path(os.path.join(ROOT, "scripts", "make_paired_data.py"))["main"]
prepare_testsets_main = runpy.run_path(os.path.join(ROOT, "scripts", "prepare_testsets.py"))["main"]


def _save(path, rgb):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  images.write_png(path, rgb)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
  from skimage import data
  root = tmp_path_factory.mktemp("hr")
  for i, f in enumerate((data.astronaut, data.coffee, data.chelsea, data.rocket)):
    img = f()
    _save(str(root / f"img{i}.png"), np.ascontiguousarray(cv2.resize(img, (img.shape[1] // 4, img.shape[0] // 4),
                                                                     interpolation=cv2.INTER_AREA)))
  _save(str(root / "small.png"), np.zeros((40, 40, 3), np.uint8))  # smaller than the crop: skipped
  return str(root)


def _tree(out):
  got = {}
  for d in ("hr", "lr", "lr_up", "ref"):
    if os.path.isdir(os.path.join(out, d)):
      for f in sorted(os.listdir(os.path.join(out, d))):
        with open(os.path.join(out, d, f), "rb") as fh:
          got[f"{d}/{f}"] = fh.read()
  return got


def test_writes_a_deterministic_resumable_set(photo_dir, tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  counts = paired.make_paired_set(f"folder:{photo_dir}", a, seed=7, crop=64)
  assert counts == {"written": 4, "kept": 0, "skipped": 0, "refs": 0}  # small.png is dropped by the header check
  files = _tree(a)
  assert len(files) == 12
  hr = images.read_image(os.path.join(a, "hr", "img0.png"))
  lr = images.read_image(os.path.join(a, "lr", "img0.png"))
  up = images.read_image(os.path.join(a, "lr_up", "img0.png"))
  assert hr.shape == up.shape == (64, 64, 3) and lr.shape == (16, 16, 3)
  ref_up = cv2.resize(lr.astype(np.float32) / 255, (64, 64), interpolation=cv2.INTER_CUBIC)
  assert np.abs(up / 255.0 - np.clip(ref_up, 0, 1)).max() <= 0.5 / 255 + 1e-6
  # Same command elsewhere, in 2 worker processes: the same bytes.
  paired.make_paired_set(f"folder:{photo_dir}", b, seed=7, crop=64, workers=2)
  assert _tree(b) == files
  # Interrupted run: files lost, a stray temporary left; rerun restores exactly those, keeps the others.
  os.remove(os.path.join(a, "lr", "img2.png"))
  os.remove(os.path.join(a, "hr", "img3.png"))
  with open(os.path.join(a, "lr", "img2.png.tmp123"), "wb") as f:
    f.write(b"partial")
  kept = os.stat(os.path.join(a, "hr", "img0.png")).st_mtime_ns
  counts = paired.make_paired_set(f"folder:{photo_dir}", a, seed=7, crop=64)
  assert counts["written"] == 2 and counts["kept"] == 2
  assert _tree(a) == files
  assert os.stat(os.path.join(a, "hr", "img0.png")).st_mtime_ns == kept
  # Another seed in the same folder is refused; another seed elsewhere differs.
  with pytest.raises(sources.DataError, match="different settings"):
    paired.make_paired_set(f"folder:{photo_dir}", a, seed=8, crop=64)
  paired.make_paired_set(f"folder:{photo_dir}", str(tmp_path / "c"), seed=8, crop=64)
  other = _tree(str(tmp_path / "c"))
  assert other["hr/img0.png"] != files["hr/img0.png"] or other["lr/img0.png"] != files["lr/img0.png"]
  meta = json.load(open(os.path.join(a, "meta.json")))
  assert meta["count"] == 4 and meta["settings"]["seed"] == 7


def test_references_and_reading_the_set_back(photo_dir, tmp_path):
  out = str(tmp_path / "refs")
  paired.make_paired_set(f"folder:{photo_dir}", out, seed=1, crop=64, limit=3)

  def nearest_x4(lr):  # a stand-in activation with the interface's shapes
    return np.repeat(np.repeat(lr, 4, 1), 4, 2)

  calls = []
  counts = paired.make_paired_set(f"folder:{photo_dir}", out, seed=1, crop=64, limit=3,
                               activation=lambda lr: calls.append(len(lr)) or nearest_x4(lr), activation_batch=2)
  assert calls == [2, 1]  # batched
  assert counts["written"] == 0 and counts["kept"] == 3 and counts["refs"] == 3
  lr = images.read_image(os.path.join(out, "lr", "img1.png"))
  ref = images.read_image(os.path.join(out, "ref", "img1.png"))
  np.testing.assert_array_equal(ref, np.repeat(np.repeat(lr, 4, 0), 4, 1))
  src = sources.PairedSource(out)
  assert len(src) == 3 and src.has_ref
  batches = list(pipeline.make_eval_dataset(out))
  assert [str(b["name"][0]) for b in batches] == ["img0", "img1", "img2"]
  b = batches[1]
  np.testing.assert_array_equal(np.rint(b["lr"][0] * 255).astype(np.uint8), lr)
  np.testing.assert_array_equal(np.rint(b["ref"][0] * 255).astype(np.uint8), ref)
  assert b["hr"].shape == b["lr_up"].shape == (1, 64, 64, 3)
  # The CLI path with the project's registered 'bicubic' activation (if that module is present).
  try:
    import cassr_jax.activation  # noqa: F401
  except ImportError:
    pass
  else:
    cli_out = str(tmp_path / "cli_refs")
    assert make_paired_main(["--source", f"folder:{photo_dir}", "--out", cli_out, "--crop", "64", "--limit", "2",
                     "--activation", "bicubic"]) == 0
    up = images.read_image(os.path.join(cli_out, "lr_up", "img0.png")).astype(int)
    assert np.abs(images.read_image(os.path.join(cli_out, "ref", "img0.png")).astype(int) - up).max() <= 2
  with pytest.raises(ValueError, match="expected"):
    paired.make_paired_set(f"folder:{photo_dir}", str(tmp_path / "bad"), seed=1, crop=64, limit=1,
                        activation=lambda lr: lr)


def test_cli_whole_images_and_errors(photo_dir, tmp_path, capsys):
  out = str(tmp_path / "whole")
  assert make_paired_main(["--source", f"folder:{photo_dir}", "--out", out, "--crop", "0", "--limit", "2"]) == 0
  hr = images.read_image(os.path.join(out, "hr", "img0.png"))
  src = images.read_image(os.path.join(photo_dir, "img0.png"))
  np.testing.assert_array_equal(hr, src[:src.shape[0] // 4 * 4, :src.shape[1] // 4 * 4])  # uncropped
  assert images.read_image(os.path.join(out, "lr", "img0.png")).shape == (hr.shape[0] // 4, hr.shape[1] // 4, 3)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert make_paired_main(["--source", f"folder:{empty}", "--out", str(tmp_path / "x")]) == 2
  assert "no usable image" in capsys.readouterr().err


def _real_like(root, layout, n=3, scale=4, rng=None):
  rng = rng or np.random.default_rng(0)
  pairs = {}
  for i in range(n):
    lh, lw = 140 + 2 * i + (i % 2), 150 + 3 * i  # odd sizes: the crop offsets must stay aligned
    lr = rng.integers(0, 256, (lh, lw, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, scale, 0), scale, 1)
    if layout == "realsr":
      base = os.path.join(root, "Canon", "Test", str(scale), f"Canon_{i:03d}")
      _save(base + "_HR.png", hr)
      _save(base + f"_LR{scale}.png", lr)
      _save(os.path.join(root, "Canon", "Test", "2", f"Canon_{i:03d}_HR.png"), hr[:8, :8])  # other scale: ignored
      pairs[f"Canon_{i:03d}"] = (hr, lr)
    else:
      _save(os.path.join(root, "test_HR", f"DSC_{i:04d}_x1.png"), hr)
      _save(os.path.join(root, "test_LR", f"DSC_{i:04d}_x{scale}.png"), lr)
      pairs[f"DSC_{i:04d}"] = (hr, lr)
  return pairs


@pytest.mark.parametrize("layout", ["realsr", "drealsr"])
def test_real_testsets_centre_crops_stay_aligned(tmp_path, layout):
  pairs = _real_like(str(tmp_path / "in"), layout)
  out = str(tmp_path / "out")
  assert prepare_testsets_main([layout, "--root", str(tmp_path / "in"), "--out", out]) == 0
  meta = json.load(open(os.path.join(out, "meta.json")))
  assert meta["count"] == 3 and sorted(meta["names"]) == sorted(pairs)
  for name, (hr_full, lr_full) in pairs.items():
    hr = images.read_image(os.path.join(out, "hr", f"{name}.png"))
    lr = images.read_image(os.path.join(out, "lr", f"{name}.png"))
    assert hr.shape == (512, 512, 3) and lr.shape == (128, 128, 3)
    np.testing.assert_array_equal(hr, np.repeat(np.repeat(lr, 4, 0), 4, 1))  # aligned
    top, left = (lr_full.shape[0] - 128) // 2, (lr_full.shape[1] - 128) // 2
    np.testing.assert_array_equal(lr, lr_full[top:top + 128, left:left + 128])  # centred
  assert len(sources.PairedSource(out)) == 3


def test_same_size_lr_is_downsampled_and_small_pairs_rejected():
  hr = np.random.default_rng(0).integers(0, 256, (600, 640, 3), dtype=np.uint8)
  h, l = testsets.center_crop_pair(hr, hr.copy(), scale=4, lr_crop=128, name="old_realsr")
  assert h.shape == (512, 512, 3) and l.shape == (128, 128, 3)
  with pytest.raises(images.ImageError, match="smaller than the 128 crop"):
    testsets.center_crop_pair(hr[:400], hr[:100, :100], scale=4, lr_crop=128, name="small")


def test_div2k_validation_protocol(photo_dir, tmp_path):
  out = str(tmp_path / "div2k")
  assert prepare_testsets_main(["div2k-val", "--source", f"folder:{photo_dir}", "--out", out, "--seed", "3"]) == 0
  names = sorted(os.listdir(os.path.join(out, "hr")))
  assert len(names) == 5  # whole images: the small one is kept too
  for n in names:
    src = images.read_image(os.path.join(photo_dir, n))
    hr = images.read_image(os.path.join(out, "hr", n))
    np.testing.assert_array_equal(hr, src[:src.shape[0] // 4 * 4, :src.shape[1] // 4 * 4])
  meta = json.load(open(os.path.join(out, "meta.json")))
  assert meta["settings"]["crop"] == 0 and meta["settings"]["preset"] == "x4plus" and meta["settings"]["seed"] == 3
