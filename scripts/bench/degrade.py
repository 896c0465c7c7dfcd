"""Benchmark: degraded pairs per second per worker process (512x512 HR crops, x4plus preset).

  python scripts/bench/degrade.py [--pairs 300] [--preset x4plus] [--crop 512] [--workers 2] [--json out.json]

1. One process, OpenCV single-threaded: pairs/s by wall clock and by the process's own CPU time (the
   per-core rate, meaningful on a shared machine), the per-stage split of that CPU time, and a
   contention-filtered rate (each of the first 100 pairs run 3 times, the fastest kept).
2. The same work spread over 1 and over --workers spawned worker processes: wall-clock pairs/s and speed-up.
3. With decoding: the pipeline's per-example work (pipeline.ExampleMaker: decode, crop, flip, degrade,
   bicubic-upsampled LR) on encoded records: 512x512 PNG tiles (compression 0 and 1, as
   scripts/prepare_train_data.py writes them) and, for comparison, a 2040x1356 PNG (a DIV2K-sized source).
HR crops are random 512x512 windows of scikit-image photos (astronaut, immunohistochemistry, retina);
example i uses the seed triple (0, 0, i) as in training.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

import cv2
import numpy as np

from cassr_jax.data import degradations as D
from cassr_jax.data import images, pipeline


def _crops(n: int, crop: int) -> list[np.ndarray]:
  from skimage import data
  photos = [data.astronaut(), data.immunohistochemistry(), data.retina()]
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    p = photos[i % len(photos)]
    if min(p.shape[:2]) < crop:
      p = cv2.resize(p, (max(crop, p.shape[1]), max(crop, p.shape[0])), interpolation=cv2.INTER_CUBIC)
    t = rng.integers(0, p.shape[0] - crop + 1)
    l = rng.integers(0, p.shape[1] - crop + 1)
    out.append(np.ascontiguousarray(p[t:t + crop, l:l + crop]))
  return out


_STATE: dict = {}


def _config(preset: str, jpeg_codec: str | None):
  cfg = D.preset(preset)
  if jpeg_codec:
    cfg.jpeg_codec = jpeg_codec
  return D.settings(cfg)


def _init(preset: str, crop: int, n: int, jpeg_codec: str | None = None):
  images.use_one_core()  # as in the pipeline's workers
  _STATE["cfg"] = _config(preset, jpeg_codec)
  _STATE["crops"] = _crops(min(n, 24), crop)
  D.degrade(_STATE["crops"][0], _STATE["cfg"], D.example_seed(0, 0, 0))  # warm caches (Poisson tables)


def _work(indices: list[int]) -> tuple[int, float]:
  t = time.process_time()
  crops, cfg = _STATE["crops"], _STATE["cfg"]
  for i in indices:
    D.degrade(crops[i % len(crops)], cfg, D.example_seed(0, 0, i))
  return len(indices), time.process_time() - t


def single_process(preset: str, crop: int, n: int, jpeg_codec: str | None = None) -> dict:
  _init(preset, crop, n, jpeg_codec)
  for i in range(1, 6):  # warm-up: every Poisson table size, code paths
    D.degrade(_STATE["crops"][i % len(_STATE["crops"])], _STATE["cfg"], D.example_seed(0, 0, 10_000 + i))
  timings: dict[str, float] = {}
  wall, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
  for i in range(n):
    D.degrade(_STATE["crops"][i % len(_STATE["crops"])], _STATE["cfg"], D.example_seed(0, 0, i), timings=timings)
  wall, cpu, main = time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - main
  # Contention-filtered cost: each pair degraded 3 times, the fastest run kept (a shared machine's other
  # jobs only ever add time). Same pairs, same seeds, so the same work.
  best = 0.0
  for i in range(min(n, 100)):
    runs = []
    for _ in range(3):
      t = time.process_time()
      D.degrade(_STATE["crops"][i % len(_STATE["crops"])], _STATE["cfg"], D.example_seed(0, 0, i))
      runs.append(time.process_time() - t)
    best += min(runs)
  best_rate = min(n, 100) / best
  total = sum(timings.values())
  return {
      "jpeg_codec": _STATE["cfg"].jpeg_codec, "usm_sharpen": _STATE["cfg"].usm_sharpen,
      "pairs": n, "wall_pairs_per_s": n / wall, "cpu_pairs_per_s": n / cpu, "cpu_ms_per_pair": 1e3 * cpu / n,
      "process_over_main_thread_cpu": cpu / main,
      "best_of_3_pairs_per_s": best_rate,
      "stage_ms_per_pair": {k: round(1e3 * v / n, 2) for k, v in sorted(timings.items(), key=lambda kv: -kv[1])},
      "stage_share": {k: round(v / total, 3) for k, v in sorted(timings.items(), key=lambda kv: -kv[1])},
  }


def pool_throughput(preset: str, crop: int, n: int, workers: int, jpeg_codec: str | None = None) -> dict:
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers, initializer=_init, initargs=(preset, crop, n, jpeg_codec)) as pool:
    pool.map(_work, [[0]] * workers)  # start and warm every worker
    chunks = [list(range(w, n, workers)) for w in range(workers)]
    t = time.perf_counter()
    results = pool.map(_work, chunks)
    wall = time.perf_counter() - t
  cpu = sum(r[1] for r in results)
  return {"workers": workers, "pairs": n, "wall_pairs_per_s": n / wall,
          "cpu_pairs_per_s_per_worker": n / cpu}


def with_decoding(preset: str, crop: int, n: int, jpeg_codec: str | None) -> dict:
  """CPU pairs/s of pipeline.ExampleMaker on PNG-encoded records (decoding included)."""
  images.use_one_core()
  config = pipeline.default_data_config()
  config.degradation = D.preset(preset)
  if jpeg_codec:
    config.degradation.jpeg_codec = jpeg_codec
  config.crop_size = crop
  crops = _crops(8, crop)
  big = cv2.resize(crops[0], (2040, 1356), interpolation=cv2.INTER_CUBIC)
  records = {}
  for level in (0, 1):
    records[f"png{level}_tile"] = [cv2.imencode(".png", c[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, level])[1].tobytes()
                                   for c in crops]
  records["png3_2040x1356"] = [cv2.imencode(".png", big[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 3])[1].tobytes()]
  out = {}
  for name, recs in records.items():
    maker = pipeline.ExampleMaker(config, 10 ** 6)
    maker.make({"image": recs[0], "name": name}, 0, 0)
    t = time.process_time()
    for i in range(n):
      maker.make({"image": recs[i % len(recs)], "name": name}, 0, i)
    cpu = time.process_time() - t
    t = time.process_time()
    for i in range(n):
      pipeline.images.decode_image(recs[i % len(recs)], name)
    dec = time.process_time() - t
    out[name] = {"cpu_pairs_per_s": n / cpu, "decode_cpu_ms": 1e3 * dec / n,
                 "kib": round(sum(map(len, recs)) / len(recs) / 1024)}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pairs", type=int, default=300)
  p.add_argument("--preset", default="x4plus", choices=sorted(D.PRESETS))
  p.add_argument("--crop", type=int, default=512)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--jpeg-codec", default=None, choices=("diffjpeg", "libjpeg"), help="override the preset's")
  p.add_argument("--no-pool", action="store_true", help="skip part 2 (worker pools)")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)
  res = {"preset": args.preset, "crop": args.crop, "cpu_count": os.cpu_count(),
         "load_average_1min": os.getloadavg()[0],
         "single": single_process(args.preset, args.crop, args.pairs, args.jpeg_codec)}
  s = res["single"]
  print(f"{args.preset} preset, {args.crop}x{args.crop} HR crops, {args.pairs} pairs "
        f"({res['cpu_count']} CPUs, load average {res['load_average_1min']:.1f} at start)")
  print(f"one process: {s['cpu_pairs_per_s']:.1f} pairs/s per core (CPU time, {s['cpu_ms_per_pair']:.1f} ms/pair), "
        f"{s['wall_pairs_per_s']:.1f} pairs/s wall; best-of-3 per pair: {s['best_of_3_pairs_per_s']:.1f} pairs/s")
  print(f"process CPU / main-thread CPU: {s['process_over_main_thread_cpu']:.2f} (above 1: other threads of the "
        f"process used CPU too, e.g. a BLAS pool that is not limited to one thread)")
  print(f"{'stage (CPU time of this thread)':<34}{'ms/pair':>9}{'share':>8}")
  for k, v in s["stage_ms_per_pair"].items():
    print(f"  {k:<32}{v:>9.2f}{s['stage_share'][k]:>8.1%}")
  print(f"  {'total':<32}{sum(s['stage_ms_per_pair'].values()):>9.2f}")
  jpeg_ms = sum(v for k, v in s["stage_ms_per_pair"].items() if k.startswith("jpeg"))
  print(f"JPEG stages ({s['jpeg_codec']}): {jpeg_ms:.2f} CPU ms/pair")
  res["decoding"] = with_decoding(args.preset, args.crop, min(args.pairs, 60), args.jpeg_codec)
  for name, d in res["decoding"].items():
    print(f"with decoding, {name} ({d['kib']} KiB): {d['cpu_pairs_per_s']:.1f} pairs/s per core, "
          f"{1e3 / d['cpu_pairs_per_s']:.1f} CPU ms/pair (decode alone {d['decode_cpu_ms']:.1f} CPU ms)")
  res["load_average_1min_end"] = os.getloadavg()[0]
  print(f"load average {res['load_average_1min_end']:.1f} after parts 1 and 3")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  if args.no_pool:
    return 0
  one = pool_throughput(args.preset, args.crop, args.pairs, 1, args.jpeg_codec)
  many = pool_throughput(args.preset, args.crop, args.pairs, args.workers, args.jpeg_codec)
  res["pool"] = [one, many]
  res["speedup"] = many["wall_pairs_per_s"] / one["wall_pairs_per_s"]
  print(f"pool: 1 worker {one['wall_pairs_per_s']:.1f} pairs/s, {args.workers} workers "
        f"{many['wall_pairs_per_s']:.1f} pairs/s (speed-up {res['speedup']:.2f}x; per worker "
        f"{many['cpu_pairs_per_s_per_worker']:.1f} pairs/s of CPU time)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
