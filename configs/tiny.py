"""A tiny random-weight CasSR for tests and the offline demo (a CPU trains it in seconds).

Shapes mirror SD-1.5 (3 cross-attention up levels, VAE x8, hint image = 8x latent) at a fraction of the
width; the weights are built in code (init.random = "tiny"), so nothing is downloaded. Give it images:
  python scripts/train.py --config configs/tiny.py --config.data.sources=folder:photos --workdir runs/tiny
"""
from cassr_jax.config import tiny_config


def get_config():
  return tiny_config()
