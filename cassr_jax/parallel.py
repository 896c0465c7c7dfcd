"""Meshes and parameter shardings from the logical axis names every parameter carries.

Logical names (cassr_jax.nn.layers): "embed_in" / "embed_out" (input and output width of a kernel), "vocab".
Rules map them to mesh axes; the default shards each kernel's output width over "fsdp" (ZeRO-3 style
parameter sharding) and replicates the rest, while batches are split over ("data", "fsdp"). A dimension that
does not divide evenly by its mesh axes is replicated instead of failing, so small layers (biases of 4
channels, the 3-channel hint conv) never block a mesh.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (("embed_out", FSDP), ("embed_in", None), ("vocab", None))


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices (every host's): data = n_devices / fsdp."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the device count {len(devices)}")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), (DATA, FSDP))


def logical_to_mesh(names, shape, mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
  table = dict(rules)
  axes = []
  for name, size in zip(names or (), shape):
    axis = table.get(name) if name is not None else None
    if axis is not None and size % mesh.shape[axis]:
      axis = None
    axes.append(axis)
  return PartitionSpec(*axes)


def param_shardings(model_or_state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every variable of a model (or nnx.State), from its logical axis names."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

  def sharding(var):
    names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
    return NamedSharding(mesh, logical_to_mesh(names, var.shape, mesh, rules))

  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Places every parameter of `model` on `mesh` per its logical names (in place); returns the model."""
  state = nnx.state(model)
  shardings = param_shardings(state, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec((DATA, FSDP)))
