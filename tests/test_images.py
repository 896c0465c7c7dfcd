"""Bad and unusual image files: each is converted correctly to 8-bit RGB or rejected naming the file."""
import io
import logging
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from cassr_jax.data import images, sources
from cassr_jax.data.images import ImageError, decode_image


@pytest.fixture
def rgb():
  from skimage import data
  return np.ascontiguousarray(data.astronaut()[::8, ::8])  # 64x64 RGB


def _encode(ext, arr, params=()):
  """cv2 encoder; arr in RGB(A) order (converted to OpenCV's BGR(A))."""
  if arr.ndim == 3 and arr.shape[2] == 3:
    arr = arr[..., ::-1]
  elif arr.ndim == 3 and arr.shape[2] == 4:
    arr = arr[..., [2, 1, 0, 3]]
  ok, buf = cv2.imencode(ext, np.ascontiguousarray(arr), list(params))
  assert ok
  return buf.tobytes()


def _pil_bytes(im, fmt, **kw):
  b = io.BytesIO()
  im.save(b, fmt, **kw)
  return b.getvalue()


@pytest.mark.parametrize("ext,params", [(".png", ()), (".bmp", ()), (".tiff", ()),
                                        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101))])  # 101: lossless WebP
def test_lossless_formats_round_trip_exactly(rgb, ext, params):
  out = decode_image(_encode(ext, rgb, params), f"x{ext}")
  assert out.dtype == np.uint8 and out.shape == rgb.shape
  np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_in_rgb_order(rgb):
  out = decode_image(_encode(".jpg", rgb, (cv2.IMWRITE_JPEG_QUALITY, 98)), "x.jpg").astype(int)
  err, swapped = np.abs(out - rgb).mean(), np.abs(out[..., ::-1] - rgb).mean()
  assert err < 6 and err < swapped / 4  # a BGR/RGB mix-up would be the larger one


def test_grayscale_and_one_bit(rgb):
  gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
  out = decode_image(_encode(".png", gray), "g.png")
  assert out.shape == gray.shape + (3,)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)
  bw = Image.fromarray(gray > 128)
  out = decode_image(_pil_bytes(bw, "PNG"), "bw.png")
  np.testing.assert_array_equal(out[..., 0], np.where(gray > 128, 255, 0))


def test_rgba_and_gray_alpha_composite_over_white(rgb):
  alpha = np.zeros(rgb.shape[:2], np.uint8)
  alpha[:, 20:40] = 128
  alpha[:, 40:] = 255
  rgba = np.dstack([rgb, alpha])
  out = decode_image(_encode(".png", rgba), "a.png").astype(np.float64)
  assert np.all(out[:, :20] == 255)  # fully transparent -> white
  np.testing.assert_array_equal(out[:, 40:], rgb[:, 40:])  # opaque -> unchanged
  a = 128 / 255
  np.testing.assert_allclose(out[:, 20:40], np.rint(rgb[:, 20:40] * a + 255 * (1 - a)), atol=1)
  la = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")
  out = decode_image(_pil_bytes(la, "PNG"), "la.png")
  assert np.all(out[:, :20] == 255) and np.array_equal(out[:, 40:, 1], rgb[:, 40:, 0])


def test_palette_with_and_without_transparency(rgb):
  pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
  expected = np.asarray(pal.convert("RGB"))
  np.testing.assert_array_equal(decode_image(_pil_bytes(pal, "PNG"), "p.png"), expected)
  idx = np.asarray(pal)
  transparent = int(idx[0, 0])
  out = decode_image(_pil_bytes(pal, "PNG", transparency=transparent), "pt.png")
  mask = idx == transparent
  assert np.all(out[mask] == 255)
  np.testing.assert_array_equal(out[~mask], expected[~mask])


def test_sixteen_bit_rgb_gray_and_tiff(rgb):
  rng = np.random.default_rng(0)
  a16 = rng.integers(0, 65536, (24, 32, 3), dtype=np.uint16)
  expected = np.rint(a16 / 257.0).astype(np.uint8)
  np.testing.assert_array_equal(decode_image(_encode(".png", a16), "16.png"), expected)
  np.testing.assert_array_equal(decode_image(_encode(".tiff", a16), "16.tif"), expected)
  g16 = a16[..., 0]
  out = decode_image(_encode(".png", g16), "g16.png")
  np.testing.assert_array_equal(out, np.repeat(np.rint(g16 / 257.0).astype(np.uint8)[..., None], 3, 2))
  f32 = rng.random((24, 32, 3)).astype(np.float32)
  out = decode_image(_encode(".tiff", f32), "f.tif")
  np.testing.assert_array_equal(out, np.rint(f32 * 255).astype(np.uint8))


def test_cmyk_jpeg(rgb):
  cmyk = Image.fromarray(rgb).convert("CMYK")
  data = _pil_bytes(cmyk, "JPEG", quality=98)
  out = decode_image(data, "cmyk.jpg")
  expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  assert out.shape == rgb.shape
  assert np.abs(out.astype(int) - expected).max() <= 3
  assert np.abs(out.astype(int) - rgb).mean() < 4


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_matches_pillow(rgb, orientation, fmt):
  base = Image.fromarray(np.ascontiguousarray(rgb[:, :48]))  # non-square: rotations swap the size
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = _pil_bytes(base, fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
  expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
  out = decode_image(data, f"o{orientation}")
  assert out.shape == expected.shape
  if fmt == "PNG":
    np.testing.assert_array_equal(out, expected)
  else:
    assert np.abs(out.astype(int) - expected).mean() < 1.5  # two JPEG decoders, same orientation
  info = images.probe_image(data)
  assert (info.height, info.width) == expected.shape[:2]


def _truncated(data, frac=0.6):
  return data[:int(len(data) * frac)]


@pytest.mark.parametrize("case", ["empty", "text", "truncated_png", "truncated_jpeg", "truncated_webp",
                                  "corrupt_png", "header_only"])
def test_unusable_data_raises_naming_the_file(rgb, case):
  png = _encode(".png", rgb)
  data = {
      "empty": b"",
      "text": b"this is not an image\n" * 10,
      "truncated_png": _truncated(png),
      "truncated_jpeg": _truncated(_encode(".jpg", rgb)),
      "truncated_webp": _truncated(_encode(".webp", rgb)),
      "corrupt_png": png[:200] + bytes(255 - b for b in png[200:400]) + png[400:],
      "header_only": png[:60],
  }[case]
  with pytest.raises(ImageError) as e:
    decode_image(data, f"/data/{case}.png")
  assert f"/data/{case}.png" in str(e.value)
  assert "Traceback" not in str(e.value)


def _png_header(width, height):
  """A small PNG file claiming a huge size (what a decompression bomb looks like before decoding)."""
  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


def test_decompression_bomb_guard(rgb):
  with pytest.raises(ImageError, match="too large"):
    decode_image(_png_header(40000, 40000), "bomb.png")  # 1.6 G pixels, rejected from the header alone
  with pytest.raises(ImageError, match="too large"):
    decode_image(_png_header(12000, 12000), "bomb2.png", max_pixels=10 ** 8)  # our limit, under Pillow's
  with pytest.raises(ImageError, match="too large"):
    decode_image(_encode(".png", rgb), "big.png", max_pixels=64 * 63)
  assert decode_image(_encode(".png", rgb), "ok.png", max_pixels=64 * 64).shape == rgb.shape


def test_tiny_images_decode():
  px = np.array([[[10, 20, 30]]], np.uint8)
  np.testing.assert_array_equal(decode_image(_encode(".png", px), "1x1.png"), px)


def test_to_rgb8_arrays():
  assert images.to_rgb8(np.zeros((4, 5), bool)).shape == (4, 5, 3)
  np.testing.assert_array_equal(images.to_rgb8(np.full((2, 2), 65535, np.int32)), np.full((2, 2, 3), 255))
  with pytest.raises(ImageError, match="shape"):
    images.to_rgb8(np.zeros((4, 5, 7), np.uint8), "seven")


def test_folder_source_skips_bad_files_with_one_warning_each(tmp_path, rgb, caplog):
  (tmp_path / "sub").mkdir()
  (tmp_path / "good.png").write_bytes(_encode(".png", rgb))
  (tmp_path / "sub" / "good.jpg").write_bytes(_encode(".jpg", rgb))
  (tmp_path / "sub" / "gray.webp").write_bytes(_encode(".webp", rgb[..., 0]))
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "notes.jpg").write_bytes(b"not an image")
  (tmp_path / "bomb.png").write_bytes(_png_header(40000, 40000))
  (tmp_path / "tiny.png").write_bytes(_encode(".png", rgb[:4, :4]))
  (tmp_path / "readme.txt").write_text("ignored: not an image extension")
  with caplog.at_level(logging.WARNING, logger="cassr_jax.data"):
    src = sources.FolderSource(tmp_path, min_size=8)
    sources.FolderSource(tmp_path, min_size=8)  # a second scan does not repeat the warnings
  assert src.files == ["good.png", "sub/good.jpg", "sub/gray.webp"]
  messages = [r.getMessage() for r in caplog.records]
  assert len(messages) == 4
  for name, reason in (("empty.png", "empty"), ("notes.jpg", "not an image"), ("bomb.png", "too large"),
                       ("tiny.png", "too small")):
    assert sum(name in m and reason in m for m in messages) == 1, (name, messages)
  assert src[0]["name"].endswith("good.png") and isinstance(src[0]["image"], bytes)


def test_source_without_usable_images_stops_with_a_clear_error(tmp_path):
  (tmp_path / "a.png").write_bytes(b"")
  (tmp_path / "b.jpg").write_bytes(b"garbage")
  with pytest.raises(sources.DataError, match=r"no usable image \(2 candidate files; .*empty file: 1"):
    sources.FolderSource(tmp_path)
  with pytest.raises(sources.DataError, match="does not exist"):
    sources.FolderSource(tmp_path / "missing")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(sources.DataError, match="no image files found"):
    sources.FolderSource(tmp_path / "empty_dir")
