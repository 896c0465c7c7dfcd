"""The paper's run on 8x A100 80GB: global batch 32 (4 per GPU), bf16 compute on fp32 master weights.

  python scripts/train.py --config configs/a100x8.py --workdir runs/cassr_a100x8
Memory per GPU (SD-1.5 frozen 3.4 GB fp32 + ControlNet/attention 1.6 GB + Adam 3.3 GB + activations with
remat) fits 80 GB without parameter sharding, so the mesh is data=8 x fsdp=1.
"""
from cassr_jax.config import PAPER_SOURCES, base_config


def get_config():
  c = base_config()
  # SD's head dim 160 is above cuDNN's limit on A100; "auto" picks XLA there.
  c.runtime.attention = "auto"
  c.runtime.dtype = "bfloat16"
  c.train.batch_size = 32
  c.mesh.fsdp = 1
  c.data.sources = PAPER_SOURCES
  c.data.num_workers = 12
  return c
