"""8x H100 80GB: global batch 64 (8 per GPU), bf16 compute, cuDNN flash attention ("auto": head dim 160 is
allowed on Hopper), parameters replicated (data=8 x fsdp=1).

  python scripts/train.py --config configs/h100x8.py --workdir runs/cassr_h100x8
"""
from cassr_jax.config import PAPER_SOURCES, base_config


def get_config():
  c = base_config()
  c.runtime.attention = "auto"
  c.runtime.dtype = "bfloat16"
  c.train.batch_size = 64
  c.mesh.fsdp = 1
  c.data.sources = PAPER_SOURCES
  c.data.num_workers = 16
  return c
