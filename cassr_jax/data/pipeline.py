"""The grain input pipeline: sources -> (crop, flip, degrade) in worker processes -> batches.

Batches are dicts of NHWC arrays:
  'hr'     float32 [0, 1] (B, crop, crop, 3)           the target (USM-sharpened if the preset says so)
  'lr'     float32 [0, 1] (B, crop/scale, crop/scale, 3)
  'lr_up'  float32 [0, 1] (B, crop, crop, 3)           bicubic-upsampled lr (cv2 INTER_CUBIC = torch bicubic
                                                         with align_corners=False), clipped to [0, 1]
  'ref'    float32 [0, 1] (B, crop, crop, 3)           only for paired sources that all carry references
  'epoch', 'index'  int64 (B,)                         the example's identity (its degradation seed)
(evaluation batches also carry 'name').

Config (`default_data_config()`; the trainer embeds it as config.data):
  sources           "kind:path[@split][*weight],..." or a list of dicts (see sources.parse_sources); kinds:
                    folder (recursive image folder), tfds (a tensorflow-datasets name, e.g. 'div2k/bicubic_x4'
                    with image_key 'hr'), paired (a set written by scripts/make_paired_data.py). Several
                    sources are mixed by weight.
  mix               'weights': source i is drawn with probability weight_i / sum(weights); 'size': with
                    weight_i * len(source_i) (all 1: every image equally likely, as one concatenated folder;
                    the paper's mixture, see paper_data_config).
  seed              seeds the shuffle and, with (epoch, example index), every random choice of an example.
  crop_size         HR crop (512 for SD-1.5); 0 = whole image (trimmed to a multiple of scale).
  small_images      'pad' (reflect-101 pad at the bottom/right up to the crop, as Real-ESRGAN does) or 'skip'.
  min_image_size    images with a side below this are always skipped (one warning each).
  hflip, rotate     augmentation: horizontal flip p=0.5; rotate adds vertical flip and transpose, p=0.5 each.
  scale             the SR factor; the same FieldReference as degradation.scale.
  degradation       a cassr_jax.data.presets preset (x4plus_preset() / mild_preset()); every number is there.
  batch_size        per host. drop_remainder: drop a last incomplete batch (only matters when num_epochs > 0).
  num_epochs        0 = repeat forever.   shuffle: global shuffle, reshuffled every epoch.
  num_workers       grain worker processes (0 = in the calling process); worker_buffer_size batches each.
  read_threads      threads per worker that decode/degrade (1: one example at a time per process).
  shard_by_process  each host reads a disjoint 1/process_count of every epoch (jax.process_index/count).
  check_images      'header': check every folder image's header when the source is built; 'none': skip it.
  max_pixels        decompression-bomb guard.   max_consecutive_failures: stop (DataError) after this many
                    unusable images in a row within a process (a source whose files are all damaged).

Determinism: an example's crop, flips and degradation depend only on (seed, epoch, index), index being its
position in the (mixed) source: the same triple gives the same bytes whatever the worker count or order.
The iterator is checkpointable: `iterator_state`/`restore_iterator_state` (a JSON-able dict), or
`orbax_save_args`/`orbax_restore_args` inside an orbax Composite (grain's handler; the worker count must
match on restore).
"""
from __future__ import annotations

import os
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np

from cassr_jax.data import degradations, images, presets, sources, tiles
from cassr_jax.data.sources import DataError
from cassr_jax.image_ops import to_uint8

_CROP_STREAM = 3  # child stream of the example seed for crop/flip draws (0-2 belong to the degradation)


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.sources = ml_collections.FieldReference("", field_type=object)  # a spec string or a list of dicts
  c.mix = "weights"
  c.seed = 0
  c.crop_size = 512
  c.small_images = "pad"
  c.min_image_size = 16
  c.hflip = True
  c.rotate = False
  c.degradation = presets.x4plus_preset()
  c.scale = c.degradation.get_ref("scale")
  c.batch_size = 4
  c.drop_remainder = True
  c.num_epochs = 0
  c.shuffle = True
  c.num_workers = 2
  c.worker_buffer_size = 2
  c.read_threads = 1
  c.shard_by_process = True
  c.check_images = "header"
  c.max_pixels = images.DEFAULT_MAX_PIXELS
  c.max_consecutive_failures = 100
  return c


def paper_data_config(tiles_root: str) -> ml_collections.ConfigDict:
  """The paper's training data: DIV2K + DIV8K + Flickr2K + OST + the first 10K of FFHQ, random 512 crops
  of the tiles that scripts/prepare_train_data.py wrote under tiles_root, every tile equally likely."""
  c = default_data_config()
  c.sources = tiles.paper_sources(tiles_root)
  c.mix = "size"
  return c


def ensure_absl_flags_parsed() -> None:
  """grain's multiprocessing reads absl flags; mark them parsed when no absl app did (tests, notebooks)."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  images.use_one_core()  # one core per worker; results do not depend on it


def _pad_to(img: np.ndarray, height: int, width: int) -> np.ndarray:
  h, w = img.shape[:2]
  if h >= height and w >= width:
    return img
  return cv2.copyMakeBorder(img, 0, max(0, height - h), 0, max(0, width - w), cv2.BORDER_REFLECT_101)


def bicubic_up(lr_u8: np.ndarray, height: int, width: int) -> np.ndarray:
  """clip(bicubic(lr)) as float32 [0, 1] (cv2 INTER_CUBIC: a = -0.75, half-pixel centres)."""
  up = cv2.resize(lr_u8.astype(np.float32) * np.float32(1 / 255), (width, height), interpolation=cv2.INTER_CUBIC)
  return np.clip(up, 0.0, 1.0, out=up)


class ExampleMaker:
  """record -> training example (crop, flips, degradation); None for unusable records.

  Picklable (runs in grain workers). `length` is the source length: the grain index i of an element is
  epoch * length + example index.
  """

  def __init__(self, config: ml_collections.ConfigDict, length: int, *, with_ref: bool = False,
               keep_names: bool = False):
    self.deg = presets.settings(config.degradation)
    if int(config.scale) != self.deg.scale:
      raise DataError(f"config.data.scale={config.scale} differs from degradation.scale={self.deg.scale}")
    self.scale = self.deg.scale
    self.seed = int(config.seed)
    self.crop = int(config.crop_size)
    if self.crop < 0 or self.crop % self.scale:
      raise DataError(f"config.data.crop_size={self.crop} must be 0 or a positive multiple of scale={self.scale}")
    self.small = str(config.small_images)
    if self.small not in ("pad", "skip"):
      raise DataError(f"config.data.small_images={self.small!r} must be 'pad' or 'skip'")
    self.min_size = max(1, int(config.min_image_size))
    self.hflip, self.rotate = bool(config.hflip), bool(config.rotate)
    self.max_pixels = int(config.max_pixels)
    self.max_failures = int(config.max_consecutive_failures)
    self.length = int(length)
    self.with_ref = with_ref
    self.keep_names = keep_names
    self._failures: list[str] = []

  # -- helpers --------------------------------------------------------------------------------------------
  def _skip(self, name: str, message: str, *, failure: bool = True):
    """Warns once about `name`; damaged files (failure=True) count towards max_consecutive_failures."""
    images.warn_once(name, message)
    if not failure:
      return None
    self._failures.append(name)
    if len(self._failures) >= self.max_failures:
      raise DataError(f"{len(self._failures)} unusable images in a row (last: {self._failures[-3:]}); "
                      "is the data source damaged? See the warnings above for each file.")
    return None

  def _decode(self, data: bytes, name: str):
    try:
      img = images.decode_image(data, name, max_pixels=self.max_pixels)
    except images.ImageError as e:
      return self._skip(name, str(e))
    if min(img.shape[:2]) < self.min_size:
      return self._skip(name, f"{name}: image too small ({img.shape[1]}x{img.shape[0]} < min_image_size "
                              f"{self.min_size})", failure=False)
    return img

  def _augment(self, arrays: list[np.ndarray], u: np.ndarray) -> list[np.ndarray]:
    if self.hflip and u[2] < 0.5:
      arrays = [a[:, ::-1] for a in arrays]
    if self.rotate:
      if u[3] < 0.5:
        arrays = [a[::-1] for a in arrays]
      if u[4] < 0.5:
        arrays = [a.transpose(1, 0, 2) for a in arrays]
    return [np.ascontiguousarray(a) for a in arrays]

  # -- examples -------------------------------------------------------------------------------------------
  def make(self, record: dict[str, Any], epoch: int, index: int) -> dict[str, Any] | None:
    """The example of `record` with the randomness of (seed, epoch, index)."""
    seq = degradations.example_seed(self.seed, epoch, index)
    u = degradations.child_rng(seq, _CROP_STREAM).random(5)  # top, left, hflip, vflip, transpose
    if "lr" in record:
      out = self._paired(record, u)
    else:
      out = self._degraded(record, u, seq)
    if out is None:
      return None
    self._failures.clear()
    out["epoch"] = np.int64(epoch)
    out["index"] = np.int64(index)
    if self.keep_names:
      out["name"] = str(record["name"])
    return out

  def __call__(self, i: int, record: dict[str, Any]) -> dict[str, Any] | None:
    epoch, index = divmod(int(i), self.length)
    return self.make(record, epoch, index)

  def _degraded(self, record, u, seq):
    name = record["name"]
    img = self._decode(record["image"], name)
    if img is None:
      return None
    h, w = img.shape[:2]
    if self.crop:
      if h < self.crop or w < self.crop:
        if self.small == "skip":
          return self._skip(name, f"{name}: {w}x{h} is smaller than the {self.crop} crop (small_images='skip')",
                            failure=False)
        img = _pad_to(img, self.crop, self.crop)
        h, w = img.shape[:2]
      top = int(u[0] * (h - self.crop + 1))
      left = int(u[1] * (w - self.crop + 1))
      img = img[top:top + self.crop, left:left + self.crop]
    else:
      img = img[:h - h % self.scale, :w - w % self.scale]
      if img.size == 0:
        return self._skip(name, f"{name}: {w}x{h} is smaller than the scale {self.scale}", failure=False)
    (img,) = self._augment([img], u)
    pair = degradations.degrade(img, self.deg, seq)
    hr, lr = pair["hr"], pair["lr"]
    return {"hr": hr, "lr": lr, "lr_up": bicubic_up(lr, *hr.shape[:2])}

  def _paired(self, record, u):
    name = record["name"]
    hr = self._decode(record["hr"], record.get("hr_name", name))
    lr = self._decode(record["lr"], record.get("lr_name", name)) if hr is not None else None
    if hr is None or lr is None:
      return None
    arrays = [hr, lr]
    if self.with_ref:
      if "ref" not in record:
        return self._skip(name, f"{name}: no reference image")
      ref = self._decode(record["ref"], record.get("ref_name", name))
      if ref is None:
        return None
      if ref.shape != hr.shape:
        return self._skip(name, f"{name}: reference {ref.shape[1]}x{ref.shape[0]} differs from HR "
                                f"{hr.shape[1]}x{hr.shape[0]}")
      arrays.append(ref)
    s = self.scale
    if hr.shape[:2] != (lr.shape[0] * s, lr.shape[1] * s):
      return self._skip(name, f"{name}: HR {hr.shape[1]}x{hr.shape[0]} is not {s}x the LR "
                              f"{lr.shape[1]}x{lr.shape[0]}")
    if self.crop:
      factors = [s, 1, s][:len(arrays)]  # pixel size of hr, lr, ref relative to the LR grid
      lc = self.crop // s
      lh, lw = lr.shape[:2]
      if lh < lc or lw < lc:
        if self.small == "skip":
          return self._skip(name, f"{name}: LR {lw}x{lh} is smaller than the {lc} crop (small_images='skip')",
                            failure=False)
        arrays = [_pad_to(a, lc * f, lc * f) for a, f in zip(arrays, factors)]
        lh, lw = arrays[1].shape[:2]
      top, left = int(u[0] * (lh - lc + 1)), int(u[1] * (lw - lc + 1))
      arrays = [a[top * f:(top + lc) * f, left * f:(left + lc) * f] for a, f in zip(arrays, factors)]
    arrays = self._augment(arrays, u)
    out = {"hr": arrays[0], "lr": arrays[1], "lr_up": bicubic_up(arrays[1], *arrays[0].shape[:2])}
    if self.with_ref:
      out["ref"] = arrays[2]
    return out


class OfflineExampleBuilder:
  """Builds example i of one source with the randomness of (seed, epoch 0, i), in any process.

  Picklable without its source (re-opened lazily, header checks off), for process pools such as the one of
  scripts/make_paired_data.py. Returns (i, {'hr', 'lr' uint8, 'lr_up' uint8}) or (i, None) for a skipped image.
  """

  def __init__(self, spec: sources.SourceSpec, config: ml_collections.ConfigDict, length: int):
    self.spec, self.config, self.length = spec, config, int(length)
    self._state = None

  def __getstate__(self):
    return {"spec": self.spec, "config": self.config, "length": self.length, "_state": None}

  def __call__(self, index: int):
    if self._state is None:
      images.use_one_core()
      self._state = (sources.source_from_spec(self.spec, check="none"), ExampleMaker(self.config, self.length))
    src, maker = self._state
    ex = maker.make(src[index], 0, index)
    if ex is None:
      return index, None
    return index, {"hr": ex["hr"], "lr": ex["lr"], "lr_up": to_uint8(ex["lr_up"])}


class _ToFloat:
  """uint8 images -> float32 [0, 1] (in the consuming process: uint8 is 4x cheaper to move between processes)."""

  def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
    out = dict(batch)
    for key in ("hr", "lr", "ref"):
      if key in out:
        out[key] = out[key].astype(np.float32) * np.float32(1 / 255)
    return out


def build_sources(config: ml_collections.ConfigDict):
  """(list of sources, weights, with_ref) for config.sources."""
  specs = sources.parse_sources(config.sources)
  crop = int(config.crop_size)
  min_size = crop if (config.small_images == "skip" and crop) else max(1, int(config.min_image_size))
  built = [sources.source_from_spec(s, check=str(config.check_images), min_size=min_size,
                                    max_pixels=int(config.max_pixels)) for s in specs]
  paired = [isinstance(s, sources.PairedSource) for s in built]
  with_ref = all(paired) and all(s.has_ref for s in built)
  mix = str(config.get("mix", "weights"))
  if mix not in ("weights", "size"):
    raise DataError(f"config.data.mix={mix!r} must be 'weights' or 'size'")
  weights = [s.weight * (len(b) if mix == "size" else 1) for s, b in zip(specs, built)]
  return built, weights, with_ref


def _process_shard(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # only for the host index

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} not in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def make_train_dataset(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                       process_count: int | None = None, num_workers: int | None = None,
                       keep_names: bool = False) -> grain.IterDataset:
  """The batched IterDataset of config (config.data of the trainer)."""
  built, weights, with_ref = build_sources(config)
  maps = [grain.MapDataset.source(s) for s in built]
  ds = maps[0] if len(maps) == 1 else grain.MapDataset.mix(maps, weights)
  length = len(ds)
  ds = ds.map_with_index(ExampleMaker(config, length, with_ref=with_ref, keep_names=keep_names))
  if config.shuffle:
    ds = ds.shuffle(seed=int(config.seed) % 2 ** 32)
  if config.shard_by_process:
    pi, pc = _process_shard(process_index, process_count)
    if pc > 1:
      if length < pc:
        raise DataError(f"data sources hold {length} examples, fewer than the {pc} processes")
      ds = ds[pi::pc]
  epochs = int(config.num_epochs)
  ds = ds.repeat(None if epochs <= 0 else epochs)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, int(config.read_threads)),
                                            prefetch_buffer_size=max(2, int(config.batch_size))))
  # (to_iter_dataset drops the None of skipped records.)
  it = it.batch(int(config.batch_size), drop_remainder=bool(config.drop_remainder))
  workers = int(config.num_workers if num_workers is None else num_workers)
  if workers > 0:
    ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=int(config.worker_buffer_size)),
                        worker_init_fn=_worker_init)
  return it.map(_ToFloat())


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                        process_count: int | None = None, num_workers: int | None = None,
                        state: dict | None = None):
  """A checkpointable iterator over training batches (see module docstring); `state` resumes one."""
  it = iter(make_train_dataset(config, process_index=process_index, process_count=process_count,
                               num_workers=num_workers))
  if state is not None:
    restore_iterator_state(it, state)
  return it


def make_eval_dataset(root: str | os.PathLike, *, config: ml_collections.ConfigDict | None = None,
                      batch_size: int = 1) -> grain.IterDataset:
  """A paired set (scripts/make_paired_data.py) in order, whole images, one pass; batches carry 'name'."""
  c = default_data_config() if config is None else ml_collections.ConfigDict(config.to_dict())
  c.sources = f"paired:{os.fspath(root)}"
  c.crop_size, c.hflip, c.rotate, c.shuffle = 0, False, False, False
  c.num_epochs, c.num_workers, c.batch_size, c.drop_remainder = 1, 0, batch_size, False
  c.shard_by_process = False
  return make_train_dataset(c, keep_names=True)


def iterator_state(iterator) -> dict:
  """The iterator's position (a JSON-serialisable dict)."""
  return iterator.get_state()


def restore_iterator_state(iterator, state: dict) -> None:
  iterator.set_state(state)


def orbax_save_args(iterator):
  """For ocp.args.Composite(..., data=orbax_save_args(it)) in an orbax CheckpointManager.save."""
  return grain.checkpoint.CheckpointSave(iterator)


def orbax_restore_args(iterator):
  """For ocp.args.Composite(..., data=orbax_restore_args(it)) in CheckpointManager.restore (in place)."""
  return grain.checkpoint.CheckpointRestore(iterator)
