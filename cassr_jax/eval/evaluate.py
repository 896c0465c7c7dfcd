"""Evaluates a folder of results against a folder of ground truth.

Pairs are matched by file stem (pred/0001.png <-> gt/0001.jpg). Every pairing problem (a result without a
ground truth or the other way round, two files with one stem, an unreadable header, different sizes) is
collected and raised at once in a PairingError naming the files.

Metrics run on batches of equal-size images, sharded over the local devices (the batch is padded to a
multiple of the device count by repeating its last image; the padded scores are dropped). Distribution
metrics (FID) collect features over the whole set and compare the two sets at the end. A metric that no
backend can load is reported as unavailable with the reason; one that fails while running is reported as
failed with the error; neither produces a number.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np

from cassr_jax import image_ops, parallel
from cassr_jax.data import images
from cassr_jax.eval import metrics as metrics_lib
from cassr_jax.eval.results import FAILED, OK, UNAVAILABLE, EvalResult, ImagePair, MetricSummary, PairingError

logger = logging.getLogger("cassr_jax.eval")



def list_images(folder: str | os.PathLike, what: str, problems: list[str]) -> dict[str, str]:
  """stem -> path of the image files directly in `folder`; appends problems (missing folder, stem clashes)."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    problems.append(f"{what} folder {folder} does not exist")
    return {}
  by_stem: dict[str, list[str]] = collections.defaultdict(list)
  for fname in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(fname)
    if ext.lower() in images.IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, fname)):
      by_stem[stem].append(os.path.join(folder, fname))
  for stem, paths in by_stem.items():
    if len(paths) > 1:
      problems.append(f"{what}: several files share the name {stem!r}: {', '.join(paths)}")
  if not by_stem:
    problems.append(f"{what} folder {folder} has no images ({', '.join(images.IMAGE_EXTENSIONS)})")
  return {stem: paths[0] for stem, paths in by_stem.items()}


def find_pairs(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, *, lq_dir: str | os.PathLike | None = None,
               ref_dir: str | os.PathLike | None = None) -> list[ImagePair]:
  """Pairs sorted by name, or a PairingError listing every problem."""
  problems: list[str] = []
  pred = list_images(pred_dir, "pred", problems)
  gt = list_images(gt_dir, "gt", problems)
  folders = {"lq": lq_dir, "ref": ref_dir}
  extra = {what: list_images(folder, what, problems) if folder is not None else None
           for what, folder in folders.items()}
  for stem in sorted(set(pred) - set(gt)):
    problems.append(f"{pred[stem]}: no ground truth named {stem}.* in {os.fspath(gt_dir)}")
  for stem in sorted(set(gt) - set(pred)):
    problems.append(f"{gt[stem]}: no result named {stem}.* in {os.fspath(pred_dir)}")
  pairs = []
  for stem in sorted(set(pred) & set(gt)):
    sizes = []
    for path in (pred[stem], gt[stem]):
      try:
        info = images.probe_image(path)
        sizes.append((info.width, info.height))
      except images.ImageError as e:
        problems.append(str(e))
    for what, found in extra.items():
      if found is not None and stem not in found:
        problems.append(f"{pred[stem]}: no {what} image named {stem}.* in {os.fspath(folders[what])}")
    if len(sizes) == 2 and sizes[0] != sizes[1]:
      problems.append(f"size mismatch: {pred[stem]} is {sizes[0][0]}x{sizes[0][1]} but {gt[stem]} is "
                      f"{sizes[1][0]}x{sizes[1][1]}")
    if len(sizes) == 2:
      pairs.append(ImagePair(stem, pred[stem], gt[stem], *sizes[1], lq=(extra["lq"] or {}).get(stem),
                             ref=(extra["ref"] or {}).get(stem)))
  if problems:
    raise PairingError(problems)
  return pairs


def _pad_to(batch: np.ndarray, multiple: int) -> np.ndarray:
  extra = -len(batch) % multiple
  return batch if not extra else np.concatenate([batch, np.repeat(batch[-1:], extra, axis=0)])


def _crop(x, border: int):
  return x if border <= 0 else x[:, border:-border, border:-border, :]


def _read_pair(pair: ImagePair) -> tuple[np.ndarray, np.ndarray]:
  pred, gt = images.read_image(pair.pred), images.read_image(pair.gt)
  if pred.shape != gt.shape:
    raise images.ImageError(pair.pred, f"decoded size {pred.shape[1]}x{pred.shape[0]} differs from "
                                       f"{pair.gt} ({gt.shape[1]}x{gt.shape[0]})")
  return image_ops.to_float01(pred), image_ops.to_float01(gt)


def _read_batches(pairs: Sequence[ImagePair], batch_size: int):
  """Yields (pairs, preds, gts, [(name, reason) of unreadable pairs]) per batch of equal-size images.
  Decoding (OpenCV releases the GIL) runs in threads, and the next batch is read while the caller scores
  the current one."""
  groups: dict[tuple[int, int], list[ImagePair]] = collections.defaultdict(list)
  for p in pairs:
    groups[(p.height, p.width)].append(p)
  chunks = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]

  def read(pair: ImagePair):
    try:
      return _read_pair(pair)
    except images.ImageError as e:
      return e

  with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
    submitted = [pool.submit(read, p) for p in chunks[0]] if chunks else []
    for index, chunk in enumerate(chunks):
      current = submitted
      if index + 1 < len(chunks):
        submitted = [pool.submit(read, p) for p in chunks[index + 1]]
      good, preds, gts, bad = [], [], [], []
      for pair, future in zip(chunk, current):
        item = future.result()
        if isinstance(item, images.ImageError):
          bad.append((pair.name, str(item)))
        else:
          good.append(pair)
          preds.append(item[0])
          gts.append(item[1])
      yield good, preds, gts, bad


def evaluate(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, *, metrics: str | Sequence[str] | None = None,
             lq_dir: str | os.PathLike | None = None, ref_dir: str | os.PathLike | None = None,
             crop_border: int = 0, weights_dir: str | os.PathLike | None = None, batch_size: int = 8,
             devices: Sequence[jax.Device] | None = None,
             backends: Sequence[str] = metrics_lib.BACKENDS) -> EvalResult:
  """Scores every pair; crop_border trims that many pixels per side for the pixel metrics (PSNR/SSIM)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if crop_border < 0:
    raise ValueError(f"crop_border must be >= 0, got {crop_border}")
  names = metrics_lib.parse_metric_list(metrics)
  pairs = find_pairs(pred_dir, gt_dir, lq_dir=lq_dir, ref_dir=ref_dir)
  if crop_border and any(min(p.width, p.height) <= 2 * crop_border for p in pairs):
    small = [p.name for p in pairs if min(p.width, p.height) <= 2 * crop_border]
    raise ValueError(f"crop_border={crop_border} leaves no pixels of {small}")

  resolved = {n: metrics_lib.resolve(n, weights_dir=weights_dir, backends=backends) for n in names}
  summary: dict[str, MetricSummary] = {}
  for n, r in resolved.items():
    inf = metrics_lib.info(n, r.metric)
    summary[n] = MetricSummary(n, inf.label, inf.higher_is_better, getattr(r.metric, "kind", inf.kind),
                               OK if r.available else UNAVAILABLE, r.backend, reason=r.reason)
    if not r.available:
      logger.warning("metric %s unavailable: %s", n, r.reason)
  running = {n: r.metric for n, r in resolved.items() if r.available}

  devices = list(jax.local_devices() if devices is None else devices)
  sharding = parallel.batch_sharding(parallel.make_mesh(devices=devices))
  per_image: dict[str, dict[str, float]] = {}
  features: dict[str, tuple[list, list]] = {
      n: ([], []) for n, m in running.items() if summary[n].kind == metrics_lib.DISTRIBUTION
      and hasattr(m, "features") and metrics_lib.distribution_distance(m) is not None}
  skipped: list[tuple[str, str]] = []

  def fail(n: str, e: Exception) -> None:
    # Weights looked up on first use and not found: the metric is unavailable, not broken.
    status = UNAVAILABLE if isinstance(e, FileNotFoundError) else FAILED
    if status == FAILED:
      logger.exception("metric %s failed", n)
    else:
      logger.warning("metric %s unavailable: %s", n, e)
    summary[n].status, summary[n].reason = status, metrics_lib.short_error(e)
    running.pop(n, None)

  for chunk, preds, gts, bad in _read_batches(pairs, batch_size):
    for name, reason in bad:
      logger.error("skipping %s: %s", name, reason)
      skipped.append((name, reason))
    if chunk:
      n_real = len(chunk)
      pred_b = jax.device_put(_pad_to(np.stack(preds), len(devices)), sharding)
      gt_b = jax.device_put(_pad_to(np.stack(gts), len(devices)), sharding)
      for pair in chunk:
        per_image.setdefault(pair.name, {})
      for n, metric in list(running.items()):
        try:
          if n in features:
            features[n][0].append(np.asarray(metric.features(pred_b))[:n_real])
            features[n][1].append(np.asarray(metric.features(gt_b))[:n_real])
          elif summary[n].kind == metrics_lib.DISTRIBUTION:
            continue  # folder-based (pyiqa FID): computed once below
          else:
            border = crop_border if n in metrics_lib.PIXEL_METRICS else 0
            scores = np.asarray(metric(_crop(pred_b, border), _crop(gt_b, border)), np.float64).reshape(-1)
            if scores.shape[0] != len(pred_b):
              raise ValueError(f"returned {scores.shape[0]} scores for a batch of {len(pred_b)}")
            for pair, s in zip(chunk, scores[:n_real]):
              per_image[pair.name][n] = float(s)
        except Exception as e:  # noqa: BLE001 - one broken metric must not stop the others
          fail(n, e)

  for n, metric in list(running.items()):
    s = summary[n]
    try:
      if n in features:
        a, b = features[n]
        if not a:
          raise ValueError("no images were read")
        distance = metrics_lib.distribution_distance(metric)
        s.value, s.count = float(distance(np.concatenate(a), np.concatenate(b))), sum(map(len, a))
      elif s.kind == metrics_lib.DISTRIBUTION:
        s.value, s.count = float(metric.from_folders(os.fspath(pred_dir), os.fspath(gt_dir))), len(pairs)
      else:
        values = [v[n] for v in per_image.values() if n in v]
        if not values:
          raise ValueError("no images were read")
        s.value, s.count = float(np.mean(values)), len(values)
    except Exception as e:  # noqa: BLE001
      fail(n, e)
  config = {"pred_dir": os.fspath(pred_dir), "gt_dir": os.fspath(gt_dir),
            "lq_dir": None if lq_dir is None else os.fspath(lq_dir),
            "ref_dir": None if ref_dir is None else os.fspath(ref_dir), "crop_border": crop_border,
            "batch_size": batch_size, "devices": len(devices), "backends": list(backends),
            "weights_dir": None if weights_dir is None else os.fspath(weights_dir)}
  return EvalResult(pairs, names, per_image, summary, skipped, config)
