"""A tiny random-weight CasSR for tests and the offline demo (runs on a laptop CPU in seconds).

Shapes mirror SD-1.5 (3 cross-attention up levels, hint image = 8x latent) at a fraction of the width.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.workdir = "runs/cassr_tiny"
  c.pretrained = "tiny-random"    # built in code: no download
  c.model.dtype = "float32"
  c.model.attention = "xla"
  c.model.tiny_unet = dict(
      block_out_channels=(16, 32, 32, 32), layers_per_block=1, heads=(2, 2, 2, 2),
      cross_attention_dim=32, norm_num_groups=8)
  c.activation.name = "bicubic"
  c.data.crop_size = 64
  c.data.batch_size = 2
  c.data.num_workers = 0
  c.train.batch_size = 2
  c.train.steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.sample.steps = 2
  return c
