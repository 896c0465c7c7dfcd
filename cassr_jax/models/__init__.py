"""Flax NNX models: SD-1.5 U-Net, VAE, CLIP text encoder, ControlNet, CasSR U-Net, RRDBNet, SCEdit.

Each model module defines MODEL_KIND (its config class and builder); cassr_jax.registry.MODELS finds it by
model_type, so models never import the checkpoint or conversion layers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelKind:
  config_cls: type
  build: Callable[..., nnx.Module]  # build(config, *, policy, rngs, **runtime_options)


def _under(dotted: str, prefixes) -> bool:
  return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)


def trainable_filter(model: nnx.Module) -> nnx.filterlib.Filter:
  """NNX filter of the parameters that train, for any model with `trained_parts() -> (include, exclude)`:
  dotted path prefixes of the trained sub-modules, and of the parts inside them that stay frozen."""
  include, exclude = model.trained_parts()

  def is_trainable(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    dotted = ".".join(str(p) for p in path)
    return _under(dotted, include) and not _under(dotted, exclude)

  return is_trainable


def frozen_filter(model: nnx.Module) -> nnx.filterlib.Filter:
  """Every parameter that trainable_filter(model) leaves out."""
  trainable = trainable_filter(model)
  return lambda path, value: isinstance(value, nnx.Param) and not trainable(path, value)


def config_from_dict(config_cls: type, values: dict[str, Any]):
  """Builds a config dataclass, naming unknown keys in the error (lists become tuples).

  A field whose default is itself a config dataclass (CasSRConfig.unet, ...) is parsed recursively.
  """
  fields = {f.name: f for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"{config_cls.__name__}: unknown config keys {unknown}")
  parsed = {}
  for key, value in values.items():
    default = fields[key].default
    if dataclasses.is_dataclass(default) and isinstance(value, dict):
      value = config_from_dict(type(default), value)
    parsed[key] = tuple(value) if isinstance(value, list) else value
  return config_cls(**parsed)
