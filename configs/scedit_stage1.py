"""Stage 1: the SCEdit CSC-Tuner (and hint encoder) on the frozen SD-1.5 U-Net, conditioned on the upsampled LR
image, trained with the plain diffusion loss on the HR crop (no reference). The paper trains it with the same
settings as stage 2 (Adam 5e-4, 100K steps, 512 crops, the same data); hardware and batch as a100x8.

  python scripts/train.py --config configs/scedit_stage1.py --workdir runs/scedit
  cassr-convert --kind run --source runs/scedit --out weights/scedit
The export is an activation directory (scedit/ vae/ text_encoder/ tokenizer/ scheduler_config.json
activation.json): export.load_activation('weights/scedit'), or
build_activation('scedit', weights='weights/scedit/scedit', pretrained='weights/scedit'); stage-2 training then
reads its references from a paired set (scripts/make_paired_data.py --activation scedit ...).
Tiny CPU demo: --config.init.pretrained= --config.init.random=tiny --config.runtime.dtype=float32 ...
"""
import os
import runpy

import ml_collections


def get_config():
  # The hardware, batch, precision and data of the paper's run (configs/a100x8.py, loaded by path so this file
  # works from any directory as the others do).
  c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "a100x8.py"))["get_config"]()
  # The model section is SCEditConfig's switches (U-Net shapes come from init).
  c.model = ml_collections.ConfigDict({"kind": "scedit", "mode": "csc", "scale": 1.0})
  c.activation = ml_collections.ConfigDict({"name": "none"})  # SCEdit is the stage-1 model itself
  # SCEditActivation's defaults (pure-noise start, no colour fix) with the stage-2 sampler and guidance.
  c.sample.steps = 20
  return c
