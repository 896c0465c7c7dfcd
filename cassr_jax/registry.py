"""Named, lazily imported registries shared by models, stage-1 activations and samplers.

A registry maps a name to an object. Built-in entries are written as "package.module:attribute" strings and
imported only when first asked for, so listing names never imports a model, and the modules that define the
entries need not import this one (models stay free of upward imports). Users add their own entries with
`register(name, obj)`.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


class Registry:
  """name -> object, with built-ins resolved from "module:attribute" on first use."""

  def __init__(self, what: str, builtins: Mapping[str, str]):
    self.what = what
    self._lazy = dict(builtins)
    self._entries: dict[str, Any] = {}

  def register(self, name: str, entry: Any) -> None:
    self._entries[name] = entry

  def names(self) -> list[str]:
    return sorted(set(self._entries) | set(self._lazy))

  def __contains__(self, name: str) -> bool:
    return name in self._entries or name in self._lazy

  def get(self, name: str) -> Any:
    if name not in self._entries and name in self._lazy:
      module_name, _, attribute = self._lazy[name].partition(":")
      try:
        module = importlib.import_module(module_name)
      except ModuleNotFoundError as e:
        if e.name != module_name:
          raise
        raise ValueError(f"{self.what} {name!r} is listed but its module {module_name} does not exist") from e
      self._entries.setdefault(name, getattr(module, attribute))
    if name not in self._entries:
      raise ValueError(f"unknown {self.what} {name!r}; known: {self.names()}")
    return self._entries[name]


# model_type (as written in model.json) -> the model module's MODEL_KIND (cassr_jax.models.ModelKind).
MODELS = Registry("model_type", {
    "unet": "cassr_jax.models.unet:MODEL_KIND",
    "vae": "cassr_jax.models.vae:MODEL_KIND",
    "clip_text": "cassr_jax.models.clip_text:MODEL_KIND",
    "controlnet": "cassr_jax.models.controlnet:MODEL_KIND",
    "cassr_unet": "cassr_jax.models.cassr_unet:MODEL_KIND",
    "rrdbnet": "cassr_jax.models.rrdbnet:MODEL_KIND",
    "scedit": "cassr_jax.models.scedit:MODEL_KIND",
    "controlnet_sr": "cassr_jax.models.controlnet_sr:MODEL_KIND",
})

# stage-1 activation name -> factory(**options) -> Activation (cassr_jax.activation).
ACTIVATIONS = Registry("activation", {
    "bicubic": "cassr_jax.activation.bicubic:BicubicActivation",
    "rrdbnet": "cassr_jax.activation.rrdbnet:RRDBNetActivation",
    "scedit": "cassr_jax.activation.diffusion:SCEditActivation",
    "controlnet": "cassr_jax.activation.diffusion:ControlNetActivation",
})

# sampler name -> the sampler's step module object (cassr_jax.schedulers).
SAMPLERS = Registry("sampler", {
    "ddpm": "cassr_jax.schedulers.ddpm:SAMPLER",
    "ddim": "cassr_jax.schedulers.ddim:SAMPLER",
    "dpmpp_2m": "cassr_jax.schedulers.dpmsolver:SAMPLER",
    "unipc": "cassr_jax.schedulers.unipc:SAMPLER",
})
