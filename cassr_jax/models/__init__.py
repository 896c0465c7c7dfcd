"""Flax NNX models: SD-1.5 U-Net, VAE, CLIP text encoder, ControlNet, CasSR U-Net, RRDBNet, SCEdit.

Each model module defines MODEL_KIND (its config class and builder); cassr_jax.registry.MODELS finds it by
model_type, so models never import the checkpoint or conversion layers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelKind:
  config_cls: type
  build: Callable[..., nnx.Module]  # build(config, *, policy, rngs, **runtime_options)
