"""Stage 1, image activation: LR image(s) -> reference image(s) at the output size, selected by name.

Every activation is an object with
  __call__(lr) -> ref   lr float32 (B, h, w, 3) in [0, 1]; ref float32 (B, h*scale, w*scale, 3) in [0, 1]
  scale: int            output size / input size
  jittable: bool        True when __call__ is pure JAX on static shapes, so it may run inside a jitted
                        training step (cheap modules: compute references on the fly). False for modules with
                        host-side work (e.g. diffusion sampling loops); run those once over the data set with
                        activate_images / scripts/make_paired_data.py and read the references from disk.
  pure() -> (fn, state) fn(state, lr) == self(lr) with the weights as an explicit argument, so a jitted step
                        passes them as an input instead of baking them into the program as constants.

Activations are found by name in cassr_jax.registry.ACTIVATIONS (built-ins are imported on first use);
register_activation(name, factory) adds one, with factory(**options) -> activation. build_activation accepts a name plus
options, or a config mapping {"name": ..., option: value, ...} (e.g. an ml_collections ConfigDict).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from cassr_jax.image_ops import to_float01
from cassr_jax.registry import ACTIVATIONS


@runtime_checkable
class Activation(Protocol):
  """What the rest of the project relies on (see the module docstring)."""
  name: str
  scale: int
  jittable: bool

  def __call__(self, lr: jax.Array) -> jax.Array:
    ...

  def pure(self) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    ...


def check_lr(lr, name: str) -> jax.Array:
  """Validates an activation input: float (B, h, w, 3) (a single (h, w, 3) image is not accepted)."""
  shape = getattr(lr, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"activation {name!r}: expected LR images of shape (B, h, w, 3), got {shape}")
  if not jnp.issubdtype(lr.dtype, jnp.floating):
    raise ValueError(f"activation {name!r}: expected float images in [0, 1], got dtype {lr.dtype} "
                     "(convert uint8 with image_ops.to_float01)")
  return jnp.asarray(lr, jnp.float32)


def register_activation(name: str, factory: Callable[..., Activation]) -> None:
  """Adds a user activation: factory(**options) -> Activation."""
  ACTIVATIONS.register(name, factory)


def available_activations() -> list[str]:
  return ACTIVATIONS.names()


def build_activation(name_or_config: str | Mapping[str, Any], **options) -> Activation:
  """build_activation("rrdbnet", tile=256) or build_activation({"name": "rrdbnet", "tile": 256})."""
  if isinstance(name_or_config, str):
    name = name_or_config
  else:
    config = dict(name_or_config.items())
    if "name" not in config:
      raise ValueError(f"activation config needs a 'name' key, got keys {sorted(config)}")
    name = config.pop("name")
    options = {**config, **options}
  factory = ACTIVATIONS.get(name)
  try:
    accepted = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    accepted = None
  if accepted is not None and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
    unknown = sorted(set(options) - set(accepted))
    if unknown:
      raise ValueError(f"activation {name!r}: unknown options {unknown}; accepted: {sorted(accepted)}")
  return factory(**options)


def activate_images(activation: Activation, images: Iterable[np.ndarray], *,
                    batch_size: int = 1) -> Iterator[np.ndarray]:
  """Runs `activation` over host images (H, W, 3), uint8 or float in [0, 1]; yields float32 (sH, sW, 3).

  Consecutive images of equal shape are batched up to batch_size (each new shape compiles once), so a
  folder of same-size crops goes through in batches and mixed sizes still work.
  """
  pending: list[np.ndarray] = []

  def flush():
    out = np.asarray(activation(jnp.asarray(np.stack(pending))))
    pending.clear()
    yield from out

  for image in images:
    image = to_float01(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"activate_images: expected (H, W, 3) RGB images, got shape {image.shape}")
    if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
      yield from flush()
    pending.append(image)
  if pending:
    yield from flush()
