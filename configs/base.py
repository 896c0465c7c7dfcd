"""The paper's settings (SD-1.5, Adam 5e-4, global batch 4, 100K steps, 512x512 crops): cassr_jax.config.

  python scripts/train.py --config configs/base.py --config.data.sources=folder:/data/DF2K --workdir runs/x
"""
from cassr_jax.config import base_config


def get_config():
  return base_config()
