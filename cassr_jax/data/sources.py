"""Random-access image sources for grain.

Every source returns records of encoded bytes (decoding happens in the grain workers):
  * FolderSource:  {'image': bytes, 'name': str}  all images under a folder, recursively, sorted by path;
  * TfdsSource:    {'image': bytes, 'name': str}  one image feature of a tensorflow-datasets split, read as a
                   random-access (array_record) data source with the image left encoded;
  * PairedSource:  {'hr': bytes, 'lr': bytes[, 'ref': bytes], 'name': str}  an offline paired set as written
                   by scripts/make_paired_data.py: <root>/hr, <root>/lr and optionally <root>/ref, matched
                   by file stem (<root>/lr_up is ignored: the pipeline recomputes it).
`source_from_spec` builds one from a config entry; sources are mixed with grain's MapDataset.mix.

A folder source checks every file header when it is built (check='header', the default): empty files,
non-images, images over max_pixels and images under min_size are dropped there with one warning each;
a source left with no usable image raises DataError. Damage that only a full decode finds (truncation) is
reported by the pipeline (one warning per file and process) and the example is skipped.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from cassr_jax.data import images

SOURCE_KINDS = ("folder", "tfds", "paired")


class DataError(ValueError):
  """A data source or data config that cannot be used (the message says which and why)."""


def safe_stem(rel_path: str) -> str:
  """A flat file-name stem for a relative path: folders joined by '__', other odd characters as '_'."""
  return re.sub(r"[^\w.-]", "_", os.path.splitext(rel_path)[0].replace(os.sep, "__"))


def list_images(root: str, extensions=images.IMAGE_EXTENSIONS) -> list[str]:
  if not os.path.isdir(root):
    raise DataError(f"image folder {root!r} does not exist or is not a directory")
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    for f in filenames:
      if f.startswith("."):
        continue
      if os.path.splitext(f)[1].lower() in extensions:
        found.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(found)


def _check_files(root: str, rel_paths: list[str], *, check: str, min_size: int, max_pixels: int,
                 what: str) -> tuple[list[str], collections.Counter]:
  """Header check of each file; returns the usable ones and a count of skip reasons."""
  if check not in ("header", "none"):
    raise DataError(f"{what}: check={check!r} must be 'header' or 'none'")
  if check == "none":
    return rel_paths, collections.Counter()
  keep, reasons = [], collections.Counter()
  for rel in rel_paths:
    path = os.path.join(root, rel)
    try:
      info = images.probe_image(path, path, max_pixels=max_pixels)
    except images.ImageError as e:
      images.warn_once(path, str(e))
      reasons[e.reason.split(" (")[0].split(":")[0]] += 1
      continue
    if min(info.width, info.height) < min_size:
      images.warn_once(path, f"{path}: image too small ({info.width}x{info.height} < min_size {min_size})")
      reasons["too small"] += 1
      continue
    keep.append(rel)
  return keep, reasons


def _no_usable(what: str, n: int, reasons: collections.Counter) -> DataError:
  detail = ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) or "no image files found"
  return DataError(f"{what}: no usable image ({n} candidate files; {detail})")


class FolderSource:
  """All images (PNG, JPEG, WebP, TIFF, BMP) under `root`, recursively, in sorted path order."""

  def __init__(self, root: str | os.PathLike, *, check: str = "header", min_size: int = 1,
               max_pixels: int = images.DEFAULT_MAX_PIXELS):
    self.root = os.fspath(root)
    candidates = list_images(self.root)
    self.files, reasons = _check_files(self.root, candidates, check=check, min_size=min_size,
                                       max_pixels=max_pixels, what=f"image folder {self.root!r}")
    if not self.files:
      raise _no_usable(f"image folder {self.root!r}", len(candidates), reasons)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = os.path.join(self.root, self.files[index])
    try:
      data = images.read_bytes(path)
    except images.ImageError:
      data = b""  # reported (once) by the decoder as an empty file
    return {"image": data, "name": path}

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, {len(self)} images)"


class TfdsSource:
  """One image feature of a tensorflow-datasets split as a random-access source (no TensorFlow needed).

  The dataset must be prepared in `data_dir` in array_record format (tfds build --file_format=array_record,
  or download_and_prepare(file_format='array_record')); tests build a small one locally.
  """

  def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None, image_key: str = "hr"):
    import tensorflow_datasets as tfds  # imported here: heavy, and only needed for tfds sources

    self.name, self.split, self.image_key = name, split, image_key
    where = f"tfds dataset {name!r} split {split!r} (data_dir={data_dir!r})"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      features = builder.info.features
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; all mean "cannot open"
      raise DataError(f"{where} cannot be opened: {type(e).__name__}: {e}") from None
    if image_key not in features:
      raise DataError(f"{where} has no feature {image_key!r}; features: {sorted(features.keys())}")
    try:
      self._source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001
      raise DataError(f"{where} cannot be opened as a random-access (array_record) source: "
                      f"{type(e).__name__}: {e}") from None
    if len(self._source) == 0:
      raise DataError(f"{where} is empty")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    return {"image": record[self.image_key], "name": f"tfds:{self.name}/{self.split}[{index}]"}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


def _stems(folder: str) -> dict[str, str]:
  out = {}
  for rel in list_images(folder):
    stem = os.path.splitext(rel)[0]
    out.setdefault(stem, rel)
  return out


class PairedSource:
  """An offline paired set: <root>/hr, <root>/lr and optionally <root>/ref, matched by relative stem."""

  def __init__(self, root: str | os.PathLike, *, check: str = "header", require_ref: bool = False,
               max_pixels: int = images.DEFAULT_MAX_PIXELS):
    self.root = os.fspath(root)
    hr_dir, lr_dir, ref_dir = (os.path.join(self.root, d) for d in ("hr", "lr", "ref"))
    for d in (hr_dir, lr_dir):
      if not os.path.isdir(d):
        raise DataError(f"paired set {self.root!r}: missing folder {d!r} (expected hr/ and lr/)")
    hr, lr = _stems(hr_dir), _stems(lr_dir)
    self.has_ref = os.path.isdir(ref_dir)
    if require_ref and not self.has_ref:
      raise DataError(f"paired set {self.root!r}: no ref/ folder of reference images")
    ref = _stems(ref_dir) if self.has_ref else {}
    self.examples: list[dict[str, str]] = []
    reasons = collections.Counter()
    for stem in sorted(hr):
      missing = [k for k, m in (("lr", lr), ("ref", ref)) if (k != "ref" or self.has_ref) and stem not in m]
      if missing:
        images.warn_once(os.path.join(hr_dir, hr[stem]),
                         f"{os.path.join(hr_dir, hr[stem])}: no matching {' or '.join(missing)} image")
        reasons["unmatched"] += 1
        continue
      files = {"hr": os.path.join("hr", hr[stem]), "lr": os.path.join("lr", lr[stem])}
      if self.has_ref:
        files["ref"] = os.path.join("ref", ref[stem])
      bad = False
      for key, rel in files.items():
        path = os.path.join(self.root, rel)
        if check == "header":
          try:
            images.probe_image(path, path, max_pixels=max_pixels)
          except images.ImageError as e:
            images.warn_once(path, str(e))
            reasons[e.reason.split(" (")[0].split(":")[0]] += 1
            bad = True
            break
      if not bad:
        files["name"] = stem
        self.examples.append(files)
    if not self.examples:
      raise _no_usable(f"paired set {self.root!r}", len(hr), reasons)

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self.examples[index]
    out: dict[str, Any] = {"name": ex["name"]}
    for key in ("hr", "lr", "ref"):
      if key in ex:
        path = os.path.join(self.root, ex[key])
        try:
          out[key] = images.read_bytes(path)
        except images.ImageError:
          out[key] = b""
        out[f"{key}_name"] = path
    return out

  def __repr__(self) -> str:
    return f"PairedSource({self.root!r}, {len(self)} pairs, ref={self.has_ref})"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  kind: str  # 'folder' | 'tfds' | 'paired'
  path: str  # folder / paired root, or the tfds dataset name (e.g. 'div2k/bicubic_x4')
  weight: float = 1.0
  split: str = "train"  # tfds only
  data_dir: str | None = None  # tfds only
  image_key: str = "hr"  # tfds only


def parse_sources(value: Any) -> list[SourceSpec]:
  """Source specs from a config value.

  Accepts a string "kind:path[@split][*weight], ..." (e.g. "folder:/data/DF2K*2,tfds:div2k/bicubic_x4@train")
  or a sequence of mappings with the SourceSpec fields.
  """
  if isinstance(value, str):
    specs = []
    for item in (s.strip() for s in value.split(",")):
      if not item:
        continue
      kind, sep, rest = item.partition(":")
      if not sep:
        raise DataError(f"data source {item!r}: expected 'kind:path' with kind in {SOURCE_KINDS}")
      weight = 1.0
      if "*" in rest:
        rest, w = rest.rsplit("*", 1)
        try:
          weight = float(w)
        except ValueError:
          raise DataError(f"data source {item!r}: weight {w!r} is not a number") from None
      split = "train"
      if kind == "tfds" and "@" in rest:
        rest, split = rest.rsplit("@", 1)
      specs.append(SourceSpec(kind.strip(), rest.strip(), weight, split))
  else:
    specs = []
    for entry in value or ():
      entry = dict(entry) if isinstance(entry, Mapping) else dict(entry.items())
      unknown = set(entry) - {f.name for f in dataclasses.fields(SourceSpec)}
      if unknown:
        raise DataError(f"data source {entry}: unknown fields {sorted(unknown)}")
      specs.append(SourceSpec(**entry))
  if not specs:
    raise DataError("config.data.sources is empty: give at least one image folder, tfds dataset or paired set")
  for s in specs:
    if s.kind not in SOURCE_KINDS:
      raise DataError(f"data source {s}: kind {s.kind!r} not in {SOURCE_KINDS}")
    if not s.weight > 0:
      raise DataError(f"data source {s}: weight must be > 0")
    if not s.path:
      raise DataError(f"data source {s}: empty path/name")
  return specs


def source_from_spec(spec: SourceSpec, *, check: str = "header", min_size: int = 1,
                     max_pixels: int = images.DEFAULT_MAX_PIXELS):
  if spec.kind == "folder":
    return FolderSource(spec.path, check=check, min_size=min_size, max_pixels=max_pixels)
  if spec.kind == "tfds":
    return TfdsSource(spec.path, split=spec.split, data_dir=spec.data_dir, image_key=spec.image_key)
  return PairedSource(spec.path, check=check, max_pixels=max_pixels)
