"""Writes a fixed degraded paired set (HR crop, LR, bicubic-upsampled LR[, reference]) from an image source.

  python scripts/make_paired_data.py --source folder:/data/DIV2K_valid_HR --out /data/pairs/div2k_val \
      --seed 123 --preset x4plus --crop 512 [--limit 100] [--workers 2] [--activation rrdbnet]

Layout of --out (read back by cassr_jax.data.sources.PairedSource / pipeline.make_eval_dataset):
  hr/<name>.png  lr/<name>.png  lr_up/<name>.png  [ref/<name>.png]  meta.json
Example i is made with the randomness of (seed, epoch 0, index i), so the same command always writes the same
bytes. It is resumable: run the same command again and finished examples are kept (each file is written
atomically); a command with different settings for an existing folder is refused. --activation NAME adds
reference images (stage-1 outputs from cassr_jax.activation) for examples that lack them, also to a finished set.
--crop 0 keeps whole images (trimmed to a multiple of the scale), as the paper's DIV2K-validation protocol does.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable

import numpy as np

from cassr_jax.data import degradations, images, pipeline, sources

logger = logging.getLogger("cassr_jax.data")
META = "meta.json"
KEYS = ("hr", "lr", "lr_up")


def _example_names(src) -> list[str]:
  if isinstance(src, sources.FolderSource):
    stems = [re.sub(r"[^\w.-]", "_", os.path.splitext(f)[0].replace(os.sep, "__")) for f in src.files]
    if len(set(stems)) == len(stems):
      return stems
  return [f"{i:06d}" for i in range(len(src))]


def example_config(*, seed: int, preset: str, crop: int, scale: int, usm: bool, small_images: str):
  c = pipeline.default_data_config()
  c.degradation = degradations.preset(preset)
  c.degradation.scale = scale
  c.degradation.usm_sharpen = usm
  c.scale = scale
  c.seed, c.crop_size, c.hflip, c.rotate, c.small_images = seed, crop, False, False, small_images
  return c


def _write(out_dir, key, name, rgb):
  images.write_png(os.path.join(out_dir, key, f"{name}.png"), rgb)


def make_paired_set(source: str, out_dir: str, *, seed: int = 0, preset: str = "x4plus", crop: int = 512,
                    scale: int = 4, usm: bool = False, small_images: str = "skip", limit: int | None = None,
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
      raise SystemExit(f"{out_dir} was made with different settings ({meta_path}); use a new --out folder")
  else:
    with open(meta_path + ".tmp", "w") as f:
      json.dump({"settings": settings}, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
  for k in KEYS + (("ref",) if activation is not None else ()):
    os.makedirs(os.path.join(out_dir, k), exist_ok=True)
    for f in os.listdir(os.path.join(out_dir, k)):  # temporaries of an interrupted run
      if re.search(r"\.png\.tmp\d+$", f):
        os.remove(os.path.join(out_dir, k, f))

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
        _write(out_dir, "ref", name, degradations.to_uint8(ref))
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
  with open(meta_path + ".tmp", "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(meta_path + ".tmp", meta_path)
  return counts


def _activation_from_args(name: str | None, options: list[str], scale: int):
  if not name:
    return None
  try:
    from cassr_jax import activation as act_lib  # noqa: PLC0415 - optional, heavy (jax)
  except ImportError as e:
    raise SystemExit(f"--activation needs cassr_jax.activation ({e})") from None
  kwargs = {}
  for opt in options:
    k, sep, v = opt.partition("=")
    if not sep:
      raise SystemExit(f"--activation-option {opt!r}: expected key=value")
    try:
      kwargs[k] = ast.literal_eval(v)  # numbers, booleans, tuples; anything else stays a string
    except (ValueError, SyntaxError):
      kwargs[k] = v
  act = act_lib.build_activation(name, **kwargs)
  if getattr(act, "scale", scale) != scale:
    raise SystemExit(f"activation {name!r} has scale {act.scale}, the set has scale {scale}")
  return act


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", required=True, help="folder:/path or tfds:name@split (one source)")
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--preset", default="x4plus", choices=sorted(degradations.PRESETS))
  p.add_argument("--crop", type=int, default=512, help="HR crop size; 0 = whole images")
  p.add_argument("--scale", type=int, default=4)
  p.add_argument("--usm", action="store_true", help="USM-sharpen the HR before degrading (Real-ESRGAN option)")
  p.add_argument("--small-images", default="skip", choices=("skip", "pad"))
  p.add_argument("--limit", type=int, default=None, help="only the first N source images")
  p.add_argument("--workers", type=int, default=0, help="worker processes for the degradation")
  p.add_argument("--activation", default=None, help="write ref/ with this stage-1 activation (e.g. rrdbnet)")
  p.add_argument("--activation-option", action="append", default=[], help="key=value for build_activation")
  p.add_argument("--activation-batch", type=int, default=4, help="LR images per activation call")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  act = _activation_from_args(args.activation, args.activation_option, args.scale)
  try:
    counts = make_paired_set(args.source, args.out, seed=args.seed, preset=args.preset, crop=args.crop,
                             scale=args.scale, usm=args.usm, small_images=args.small_images, limit=args.limit,
                             workers=args.workers, activation=act, activation_name=args.activation,
                             activation_batch=args.activation_batch)
  except (sources.DataError, images.ImageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(counts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
