"""Text-to-image with converted Stable Diffusion weights: shows that a conversion works.

  python scripts/convert_weights.py --source stable-diffusion-v1-5/stable-diffusion-v1-5 --out weights/sd15
  python scripts/sample_sd.py --weights weights/sd15 --prompt "a photo of an astronaut" --out astronaut.png

The schedule comes from the weights' scheduler_config.json (conversion copies it), else SD-1.5's.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from cassr_jax.data import images
from cassr_jax.pipelines import sd
from cassr_jax.registry import SAMPLERS


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", required=True, help="converted SD directory (unet/ vae/ text_encoder/ ...)")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--negative-prompt", default="")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--sampler", default="dpmpp_2m", choices=SAMPLERS.names())
  parser.add_argument("--karras", action="store_true", help="Karras sigmas (dpmpp_2m, unipc)")
  parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, nargs="+", default=[512], metavar="PIXELS",
                      help="output size: one number (square) or HEIGHT WIDTH")
  parser.add_argument("--out", default="sample.png", help="PNG path (written atomically)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  if len(args.size) not in (1, 2):
    parser.error("--size takes one number or HEIGHT WIDTH")
  height, width = (args.size * 2)[:2]

  start = time.perf_counter()
  try:
    unet, vae, text_encoder, tokenizer, schedule = sd.load_sd(args.weights)
    image = sd.text_to_image(unet, vae, text_encoder, tokenizer, args.prompt,
                             negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
                             guidance_scale=args.cfg, seed=args.seed, height=height, width=width,
                             schedule=schedule, karras=args.karras)[0]
  except (FileNotFoundError, ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  images.write_png(args.out, image)
  logging.info("%s: %dx%d, %s %d steps, cfg %g, seed %d, in %.1f s", args.out, width, height, args.sampler,
               args.steps, args.cfg, args.seed, time.perf_counter() - start)
  return 0


if __name__ == "__main__":
  sys.exit(main())
