"""A TPU v5e-32 pod slice (32 chips x 16 GB, 8 hosts): FSDP over 8 chips, data parallel over 4 groups.

16 GB per chip cannot hold frozen SD-1.5 + the trained ControlNet + Adam state replicated (about 8.3 GB of
weights and optimizer state before activations), so parameters and optimizer state are sharded over the
fsdp axis (about 1 GB per chip) and each chip keeps 2 images of the global batch of 64 with remat.

  python scripts/train.py --config configs/tpu_v5e_pod.py --workdir gs://bucket/runs/cassr_v5e
(run the same command on every host; jax.distributed initialises from the TPU environment.)
"""
from cassr_jax.config import PAPER_SOURCES, base_config


def get_config():
  c = base_config()
  c.runtime.attention = "auto"
  c.runtime.dtype = "bfloat16"
  c.runtime.remat = "full"
  c.train.batch_size = 64
  c.mesh.fsdp = 8
  c.mesh.data = -1
  c.data.sources = PAPER_SOURCES
  c.data.num_workers = 8
  return c
