"""A tiny random-weight CasSR for tests and the offline demo (a CPU trains it in seconds).

Shapes mirror SD-1.5 (3 cross-attention up levels, VAE x8, hint image = 8x latent) at a fraction of the
width; the weights are built in code (init.random = "tiny"), so nothing is downloaded. Give it images:
  python scripts/train.py --config configs/tiny.py --config.data.sources=folder:photos --workdir runs/tiny
"""
from cassr_jax.config import base_config


def get_config():
  c = base_config()
  c.init.pretrained = ""
  c.init.random = "tiny"
  c.runtime.attention = "xla"
  c.runtime.dtype = "float32"
  c.runtime.remat = "none"
  c.activation.name = "bicubic"
  c.data.crop_size = 64
  c.data.num_workers = 0
  c.data.check_images = "none"
  c.train.batch_size = 8
  c.train.steps = 4
  c.train.learning_rate = 1e-3
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.val_every = 0
  c.train.val_images = 2
  c.sample.steps = 2
  return c
