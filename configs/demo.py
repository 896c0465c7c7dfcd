"""The settings `cassr-demo` trains with: configs/tiny.py's random model reading stored RRDBNet references.

The demo (scripts/demo.py) writes the paired set first; to train on it by hand:
  cassr-train --config configs/demo.py --config.data.sources=paired:outputs/demo/data/train --workdir runs/demo
"""
from cassr_jax.cli.demo import demo_config


def get_config():
  return demo_config()
