#!/usr/bin/env python3
"""Super-resolve images: CasSR (stage 1 + stage 2) from an exported pipeline or a training run, or stage 1 only.

Same as the `cassr-infer` command; `python scripts/infer.py --help` lists the options.
"""
import sys

from cassr_jax.cli.infer import main

if __name__ == "__main__":
  sys.exit(main())
