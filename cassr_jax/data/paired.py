"""Fixed degraded paired sets (HR crop, LR, bicubic-upsampled LR[, reference]) written from an image source.

Layout of the output folder (read back by cassr_jax.data.sources.PairedSource / pipeline.make_eval_dataset):
  hr/<name>.png  lr/<name>.png  lr_up/<name>.png  [ref/<name>.png]  meta.json
Example i is made with the randomness of (seed, epoch 0, index i), so the same call always writes the same
bytes. Resumable: a second call keeps finished examples (each file is written atomically); a call with
different settings for an existing folder is refused (DataError). An `activation` adds reference images
(stage-1 outputs) for examples that lack them, also to a finished set. crop=0 keeps whole images (trimmed to
a multiple of the scale), as the paper's DIV2K-validation protocol does. CLI: scripts/make_paired_data.py.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable

import numpy as np

from cassr_jax.data import images, pipeline, presets, sources
from cassr_jax.image_ops import to_uint8

logger = logging.getLogger("cassr_jax.data")
META = "meta.json"
KEYS = ("hr", "lr", "lr_up")


def _example_names(src) -> list[str]:
  if isinstance(src, sources.FolderSource):
    stems = [sources.safe_stem(f) for f in src.files]
    if len(set(stems)) == len(stems):
      return stems
  return [f"{i:06d}" for i in range(len(src))]


def example_config(*, seed: int, preset: str, crop: int, scale: int, usm: bool | None, small_images: str):
  """The data config of a paired set: the preset (usm=None keeps its usm_sharpen), no augmentation."""
  c = pipeline.default_data_config()
  c.degradation = presets.preset(preset)
  c.degradation.scale = scale
  if usm is not None:
    c.degradation.usm_sharpen = bool(usm)
  c.scale = scale
  c.seed, c.crop_size, c.hflip, c.rotate, c.small_images = seed, crop, False, False, small_images
  return c


def _write(out_dir, key, name, rgb):
  images.write_png(os.path.join(out_dir, key, f"{name}.png"), rgb)


def make_paired_set(source: str, out_dir: str, *, seed: int = 0, preset: str = "x4plus", crop: int = 512,
                    scale: int = 4, usm: bool | None = None, small_images: str = "skip", limit: int | None = None,
                    workers: int = 0, activation: Callable[[np.ndarray], np.ndarray] | None = None,
                    activation_name: str | None = None, activation_batch: int = 4) -> dict[str, int]:
  """Writes (or completes) the paired set; returns counts {'written', 'kept', 'skipped', 'refs'}.

  `activation` maps a float32 (B, h, w, 3) LR batch in [0, 1] to (B, h*scale, w*scale, 3) references
  (the cassr_jax.activation interface); B <= activation_batch.
  """
  specs = sources.parse_sources(source)
  if len(specs) != 1 or specs[0].kind == "paired":
    raise sources.DataError(f"--source {source!r}: give exactly one folder or tfds source")
  spec = specs[0]
  config = example_config(seed=seed, preset=preset, crop=crop, scale=scale, usm=usm, small_images=small_images)
  settings = {"source": source, "seed": seed, "preset": preset, "crop": crop, "scale": scale, "usm": usm,
              "small_images": small_images, "degradation": config.degradation.to_dict()}  # --limit may grow
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, META)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    if json.loads(json.dumps(settings)) != old.get("settings"):
      raise sources.DataError(f"{out_dir} was made with different settings ({meta_path}); use a new output folder")
  else:
    images.write_json(meta_path, {"settings": settings})
  for k in KEYS + (("ref",) if activation is not None else ()):
    os.makedirs(os.path.join(out_dir, k), exist_ok=True)
    images.remove_stale_temporaries(os.path.join(out_dir, k))

  src = sources.source_from_spec(spec, check="header", min_size=crop if (crop and small_images == "skip") else 1)
  names = _example_names(src)
  n = len(src) if limit is None else min(limit, len(src))
  done = lambda i, k: os.path.exists(os.path.join(out_dir, k, f"{names[i]}.png"))  # noqa: E731
  todo = [i for i in range(n) if not all(done(i, k) for k in KEYS)]
  counts = {"written": 0, "kept": n - len(todo), "skipped": 0, "refs": 0}
  skipped: list[str] = []
  t0 = time.time()

  def finish(i, ex):
    if ex is None:
      counts["skipped"] += 1
      skipped.append(names[i])
      return
    for k in KEYS:
      _write(out_dir, k, names[i], ex[k])
    counts["written"] += 1
    if counts["written"] % 50 == 0:
      logger.info("%d/%d examples written (%.1f s)", counts["written"], len(todo), time.time() - t0)

  build = pipeline.OfflineExampleBuilder(spec, config, len(src))
  if workers > 0 and todo:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      for i, ex in pool.map(build, todo, chunksize=4):
        finish(i, ex)
  else:
    for i in todo:
      finish(*build(i))

  if activation is not None:
    pending: list[tuple[str, np.ndarray]] = []

    def flush():
      lrs = np.stack([lr for _, lr in pending]).astype(np.float32) / 255.0
      refs = np.asarray(activation(lrs))
      expected = (len(pending), lrs.shape[1] * scale, lrs.shape[2] * scale, 3)
      if refs.shape != expected:
        raise ValueError(f"activation {activation_name or activation!r} returned {refs.shape}, expected {expected}")
      for (name, _), ref in zip(pending, refs):
        _write(out_dir, "ref", name, to_uint8(ref))
      counts["refs"] += len(pending)
      pending.clear()

    for i in range(n):  # consecutive LRs of one shape go through the activation together
      if not done(i, "lr") or done(i, "ref"):
        continue
      lr = images.read_image(os.path.join(out_dir, "lr", f"{names[i]}.png"))
      if pending and (lr.shape != pending[0][1].shape or len(pending) == activation_batch):
        flush()
      pending.append((names[i], lr))
    if pending:
      flush()
  with open(meta_path) as f:
    meta = json.load(f)
  meta["count"] = sum(done(i, "hr") for i in range(n))
  meta["skipped"] = sorted(set(meta.get("skipped", [])) | set(skipped))
  if activation is not None:
    meta["activation"] = activation_name or getattr(activation, "__name__", repr(activation))
  images.write_json(meta_path, meta)
  return counts
