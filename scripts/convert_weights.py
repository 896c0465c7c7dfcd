#!/usr/bin/env python3
"""Converts PyTorch weights (SD-1.x, ControlNet, Real-ESRGAN) to cassr_jax model directories.

Same as the `cassr-convert` command; `python scripts/convert_weights.py --help` lists the options.
"""
import sys

from cassr_jax.cli.convert import main

if __name__ == "__main__":
  sys.exit(main())
