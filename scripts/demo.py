#!/usr/bin/env python3
"""CasSR end to end on photos shipped inside wheels (data, stage 1, training, sampling, evaluation) on a CPU.

Same as the `cassr-demo` command; `python scripts/demo.py --help` lists the options.
"""
import sys

from cassr_jax.cli.demo import main

if __name__ == "__main__":
  sys.exit(main())
