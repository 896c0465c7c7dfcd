"""Writes a fixed degraded paired set (HR crop, LR, bicubic-upsampled LR[, reference]) from an image source.

  python scripts/make_paired_data.py --source folder:/data/DIV2K_valid_HR --out /data/pairs/div2k_val \
      --seed 123 --preset x4plus --crop 512 [--limit 100] [--workers 2] [--activation rrdbnet]

The library function is cassr_jax.data.paired.make_paired_set (layout, determinism and resuming are described
there). --activation NAME adds reference images (stage-1 outputs from cassr_jax.activation).
Prints the counts as JSON; exit code 2 with 'error: ...' for an unusable source.
"""
from __future__ import annotations

import argparse
import ast
import sys

from cassr_jax.data import cli, paired, presets


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
  p.add_argument("--preset", default="x4plus", choices=sorted(presets.PRESETS))
  p.add_argument("--crop", type=int, default=512, help="HR crop size; 0 = whole images")
  p.add_argument("--scale", type=int, default=4)
  p.add_argument("--usm", action=argparse.BooleanOptionalAction, default=None,
                 help="degrade the USM-sharpened HR (default: the preset's choice; x4plus does, as Real-ESRGAN)")
  p.add_argument("--small-images", default="skip", choices=("skip", "pad"))
  p.add_argument("--limit", type=int, default=None, help="only the first N source images")
  p.add_argument("--workers", type=int, default=0, help="worker processes for the degradation")
  p.add_argument("--activation", default=None, help="write ref/ with this stage-1 activation (e.g. rrdbnet)")
  p.add_argument("--activation-option", action="append", default=[], help="key=value for build_activation")
  p.add_argument("--activation-batch", type=int, default=4, help="LR images per activation call")
  args = p.parse_args(argv)
  act = _activation_from_args(args.activation, args.activation_option, args.scale)
  return cli.run_job(lambda: paired.make_paired_set(
      args.source, args.out, seed=args.seed, preset=args.preset, crop=args.crop, scale=args.scale, usm=args.usm,
      small_images=args.small_images, limit=args.limit, workers=args.workers, activation=act,
      activation_name=args.activation, activation_batch=args.activation_batch))


if __name__ == "__main__":
  sys.exit(main())
