"""Robust image decoding to 8-bit RGB.

Everything that reads a picture goes through `decode_image` (bytes) or `read_image` (path):
  * PNG, JPEG, WebP, TIFF, BMP (and anything else Pillow opens); decoded with OpenCV (fast), with Pillow as
    the fallback for what OpenCV cannot read;
  * grayscale, gray+alpha, RGBA, palette (with transparency), 1-bit, CMYK, 16-bit and float images become
    (H, W, 3) uint8 RGB; 16-bit values are rounded (x / 257), floats are taken as [0, 1];
  * DECISION: transparency is composited over white (what a viewer shows), not dropped;
  * EXIF orientation is applied (so width/height are those of the displayed picture);
  * empty, non-image, corrupt and truncated data and images over `max_pixels` (decompression-bomb guard)
    raise ImageError naming the file and the reason; `warn_once` logs such a file exactly once per process.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import re
import warnings

import cv2
import numpy as np
from PIL import Image

from cassr_jax.image_ops import to_uint8

logger = logging.getLogger("cassr_jax.data")


@functools.cache
def use_one_core() -> None:
  """Makes this process compute on one thread: OpenCV's pool and every BLAS pool, for data worker processes.

  cv2.setNumThreads does not govern cv2.gemm (the DiffJPEG DCT), which calls the OpenBLAS bundled in
  OpenCV's wheel; with its default pool, a helper thread busy-waits on a second core after every call
  (measured: a worker degrading x4plus pairs used 144 CPU ms per pair instead of 69). Results do not change.
  Runs once per process (the library scan costs ~1.5 ms); later calls, e.g. per task of a pool, return at once.
  """
  import threadpoolctl  # pylint: disable=import-outside-toplevel
  cv2.setNumThreads(1)
  threadpoolctl.threadpool_limits(limits=1)

# Pillow raises DecompressionBombError beyond twice its MAX_IMAGE_PIXELS (178,956,970 pixels by default);
# our limit is the same so the two guards agree.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
_EXIF_ORIENTATION = 0x0112



def _cv2_decode(data: bytes):
  """cv2.imdecode(IMREAD_UNCHANGED) with OpenCV's own error logging silenced (we report bad files)."""
  log = getattr(getattr(cv2, "utils", None), "logging", None)
  level = log.getLogLevel() if log is not None else None
  if log is not None:
    log.setLogLevel(log.LOG_LEVEL_SILENT)
  try:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  except cv2.error:
    return None
  finally:
    if log is not None:
      log.setLogLevel(level)


def _exif(im: Image.Image) -> Image.Exif:
  """The EXIF block without decoding the pixels.

  For PNG, Pillow's getexif() loads (decodes) the whole image to look for an eXIf chunk after the image
  data, doubling the cost of reading a PNG; we read the eXIf chunk that precedes the image data (where
  writers put it) and ignore a trailing one.
  """
  if im.format == "PNG":
    exif = Image.Exif()
    raw = im.info.get("exif")
    if raw:
      exif.load(raw)
    return exif
  return im.getexif()


class ImageError(ValueError):
  """A file that cannot be used as an image; str() names the file and the reason."""

  def __init__(self, name: str, reason: str):
    super().__init__(f"{name}: {reason}")
    self.name = name
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  width: int  # after EXIF orientation
  height: int
  format: str
  mode: str
  orientation: int


_warned: set[str] = set()


def warn_once(name: str, message: str) -> None:
  """Logs `message` (which should name the file) the first time `name` is reported in this process."""
  if name not in _warned:
    _warned.add(name)
    logger.warning("skipping image: %s", message)


def probe_image(source: bytes | str | os.PathLike, name: str | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
  """Reads only the header: format, size, orientation. Raises ImageError for unusable files."""
  name = name or str(source)
  if isinstance(source, (bytes, bytearray, memoryview)):
    if len(source) == 0:
      raise ImageError(name, "empty file (0 bytes)")
    handle = io.BytesIO(source)
  else:
    try:
      if os.path.getsize(source) == 0:
        raise ImageError(name, "empty file (0 bytes)")
    except OSError as e:
      raise ImageError(name, f"cannot read file ({e.strerror or e})") from None
    handle = source
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # DecompressionBombWarning, corrupt-EXIF warnings: we decide below
      with Image.open(handle) as im:
        width, height = im.size
        fmt, mode = im.format or "unknown", im.mode
        try:
          orientation = int(_exif(im).get(_EXIF_ORIENTATION, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not make a good image unusable
          orientation = 1
  except Image.DecompressionBombError as e:
    raise ImageError(name, f"image too large, decompression-bomb guard ({e})") from None
  except Image.UnidentifiedImageError:
    # Pillow does not know every variant (e.g. 3-channel float TIFF); accept what OpenCV decodes.
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else read_bytes(source)
    arr = _cv2_decode(bytes(data))
    if arr is None:
      raise ImageError(name, "not an image (unrecognised or corrupt header)") from None
    width, height, fmt, mode, orientation = arr.shape[1], arr.shape[0], "unknown", str(arr.dtype), 1
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageError(name, f"corrupt image header ({e})") from None
  if width * height > max_pixels:
    raise ImageError(name, f"image too large: {width}x{height} = {width * height} pixels > max_pixels="
                           f"{max_pixels} (decompression-bomb guard)")
  if width == 0 or height == 0:
    raise ImageError(name, f"image has no pixels ({width}x{height})")
  if orientation not in range(1, 9):
    orientation = 1
  if orientation >= 5:
    width, height = height, width
  return ImageInfo(width, height, fmt, mode, orientation)


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
  """EXIF orientation 1-8 -> the displayed picture (same transforms as PIL.ImageOps.exif_transpose)."""
  if orientation == 2:
    a = a[:, ::-1]
  elif orientation == 3:
    a = a[::-1, ::-1]
  elif orientation == 4:
    a = a[::-1]
  elif orientation == 5:
    a = a.transpose(1, 0, 2)
  elif orientation == 6:
    a = a.transpose(1, 0, 2)[:, ::-1]
  elif orientation == 7:
    a = a.transpose(1, 0, 2)[::-1, ::-1]
  elif orientation == 8:
    a = a.transpose(1, 0, 2)[::-1]
  return np.ascontiguousarray(a)


def _pil_decode(data: bytes, name: str) -> np.ndarray:
  """Pillow decode to an array with channels in RGB(A) order (no orientation applied)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = im.mode
        if mode == "P" or mode == "PA":
          im = im.convert("RGBA" if ("transparency" in im.info or mode == "PA") else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
          im = im.convert("RGBA" if mode in ("RGBa", "La") else "RGB")
        elif mode == "1":
          im = im.convert("L")
        elif mode.startswith("I;16"):
          return np.asarray(im).astype(np.uint16)
        return np.asarray(im)
  except Image.DecompressionBombError as e:
    raise ImageError(name, f"image too large, decompression-bomb guard ({e})") from None
  except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
    raise ImageError(name, f"corrupt or truncated image data ({e})") from None


def to_rgb8(a: np.ndarray, name: str = "<array>", *, bgr: bool = False) -> np.ndarray:
  """Any decoded array (H, W) / (H, W, 1|2|3|4), bool / uint8 / uint16 / int / float -> (H, W, 3) uint8 RGB.

  bgr=True when colour channels are in OpenCV's B, G, R(, A) order.
  """
  a = np.asarray(a)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
    raise ImageError(name, f"unsupported image array shape {a.shape}")
  if a.dtype == np.bool_:
    a = a.astype(np.uint8) * 255
  channels = a.shape[2]
  has_alpha = channels in (2, 4)
  if a.dtype == np.uint8 and not has_alpha:
    if channels == 1:
      return cv2.cvtColor(a, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(a, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(a)
  # General path in float [0, 1].
  if a.dtype == np.uint8:
    f = a.astype(np.float32) / 255.0
  elif a.dtype == np.uint16:
    f = a.astype(np.float32) / 65535.0
  elif np.issubdtype(a.dtype, np.integer):  # Pillow mode 'I' (32-bit) holds 16-bit PNG/TIFF samples
    f = np.clip(a, 0, 65535).astype(np.float32) / 65535.0
  elif np.issubdtype(a.dtype, np.floating):
    f = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    f = np.clip(f, 0.0, 1.0)
  else:
    raise ImageError(name, f"unsupported pixel type {a.dtype}")
  if has_alpha:
    colour, alpha = f[..., :-1], f[..., -1:]
    f = colour * alpha + (1.0 - alpha)  # composite over white
  if f.shape[2] == 1:
    f = np.repeat(f, 3, axis=2)
  elif bgr:
    f = f[..., ::-1]
  return np.ascontiguousarray(to_uint8(f))


def decode_image(data: bytes, name: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes encoded image bytes to (H, W, 3) uint8 RGB, or raises ImageError naming `name`."""
  info = probe_image(data, name, max_pixels=max_pixels)
  arr = _cv2_decode(data)
  if arr is not None:
    rgb = to_rgb8(arr, name, bgr=True)
  else:
    rgb = to_rgb8(_pil_decode(data, name), name)
  expected = (info.height, info.width) if info.orientation < 5 else (info.width, info.height)
  if rgb.shape[:2] != expected:
    raise ImageError(name, f"decoded size {rgb.shape[1]}x{rgb.shape[0]} differs from the header's "
                           f"{expected[1]}x{expected[0]} (corrupt file)")
  return _apply_orientation(rgb, info.orientation)


def read_bytes(path: str | os.PathLike) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise ImageError(str(path), f"cannot read file ({e.strerror or e})") from None


def read_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Reads a file to (H, W, 3) uint8 RGB, or raises ImageError naming the path."""
  return decode_image(read_bytes(path), str(path), max_pixels=max_pixels)


def write_png(path: str | os.PathLike, rgb: np.ndarray, compression: int | None = None) -> None:
  """Writes (H, W, 3) uint8 RGB as PNG atomically (temporary sibling + rename); compression 0-9 (None:
  OpenCV's default)."""
  path = os.fspath(path)
  params = [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
  ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params)
  if not ok:
    raise OSError(f"{path}: PNG encoding failed")
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(buf.tobytes())
  os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj) -> None:
  """Writes obj as indented JSON atomically (temporary sibling + rename)."""
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
  """Deletes the '<file>.tmp<pid>' leftovers of atomic writes that an interrupted run left in folder."""
  for f in os.listdir(folder):
    if re.search(r"\.tmp\d+$", f):
      os.remove(os.path.join(folder, f))
