#!/usr/bin/env python3
"""Evaluate super-resolved images against ground truth: per-image CSV, Table-1 summary, grids and HTML.

Same as the `cassr-eval` command; `python scripts/evaluate.py --helpfull` lists the options.
"""
from absl import app

from cassr_jax.cli.evaluate import main

if __name__ == "__main__":
  app.run(main)
