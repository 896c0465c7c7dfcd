"""The settings `cassr-demo` trains with: configs/tiny.py's random model reading stored RRDBNet references.

The demo (scripts/demo.py) writes the paired set and fits the tiny VAE first; to train on them by hand:
  cassr-train --config configs/demo.py --config.data.sources=paired:outputs/demo/data/train \
    --config.init.vae=outputs/demo/vae --workdir runs/demo
"""
from cassr_jax.cli.demo import demo_config


def get_config():
  return demo_config()
