"""Meshes, parameter shardings from logical axis names, and host-local <-> global batches (multi-host).

Logical names (cassr_jax.nn.layers): "embed_in" / "embed_out" (input and output width of a kernel), "vocab".
Rules map them to mesh axes; the default shards each kernel's output width over "fsdp" (ZeRO-3 style
parameter sharding) and replicates the rest, while batches are split over ("data", "fsdp"). A dimension that
does not divide evenly by its mesh axes is replicated instead of failing, so small layers (biases of 4
channels, the 3-channel hint conv) never block a mesh.

Multi-host: every process builds the same global mesh (jax.make_mesh orders the devices by the physical
topology). Values every process holds in full (weights, prompts) go on it with `place`, each process
building its own shards; each process reads its own share of the global batch (`local_batch_size`), and
`host_local_to_global` turns that share into global arrays; `global_to_host_local` / `gather_to_host` bring
outputs back to numpy.
Optimizer states made by nnx.Optimizer copy their parameter's metadata, so `param_shardings` places them by
the same rules as the parameters.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)
Rules = tuple[tuple[str, str | None], ...]
DEFAULT_RULES: Rules = (("embed_out", FSDP), ("embed_in", None), ("vocab", None))


def _get(config, key: str, default):
  if config is None:
    return default
  value = config.get(key, default) if isinstance(config, Mapping) or hasattr(config, "get") else getattr(
      config, key, default)
  return default if value is None else value


def mesh_shape(mesh_config=None, n_devices: int | None = None) -> tuple[int, int]:
  """(data, fsdp) sizes from a config with `data` (-1 = the rest of the devices) and `fsdp` (default 1)."""
  n = jax.device_count() if n_devices is None else n_devices
  data, fsdp = int(_get(mesh_config, DATA, -1)), int(_get(mesh_config, FSDP, 1))
  if fsdp == -1 and data == -1:
    raise ValueError("mesh config: at most one of data and fsdp may be -1 (the rest of the devices)")
  sizes = {DATA: data, FSDP: fsdp}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh config: {name}={size} (a positive size, or -1 for the rest of the devices)")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if n % fixed:
    raise ValueError(f"mesh config: data={data} x fsdp={fsdp} does not divide the {n} devices")
  sizes = {k: (n // fixed if s == -1 else s) for k, s in sizes.items()}
  if sizes[DATA] * sizes[FSDP] != n:
    raise ValueError(f"mesh config: data={sizes[DATA]} x fsdp={sizes[FSDP]} != {n} devices "
                     "(set one of them to -1 to use the rest)")
  return sizes[DATA], sizes[FSDP]


def rules_from_config(mesh_config=None) -> Rules:
  """Logical-axis rules from `mesh_config.rules` (pairs [logical name, mesh axis or None]); default
  DEFAULT_RULES. Mesh axes must be "data" or "fsdp"."""
  rules = _get(mesh_config, "rules", None)
  if rules is None:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"mesh config: rule {rule!r} is not a pair (logical name, mesh axis or None)")
    name, axis = rule
    if axis not in (*MESH_AXES, None):
      raise ValueError(f"mesh config: rule {name!r} -> {axis!r}: mesh axes are {MESH_AXES} or None")
    out.append((str(name), axis))
  return tuple(out)


def make_mesh_from_config(mesh_config=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A topology-aware (data, fsdp) mesh over all devices of all hosts (or `devices`), via jax.make_mesh.

  mesh_config: anything with `data` / `fsdp` (ml_collections ConfigDict, dict, None = pure data parallel).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh: data = n_devices / fsdp."""
  return make_mesh_from_config({DATA: -1, FSDP: fsdp}, devices)


def logical_to_mesh(names, shape, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
  table = dict(rules)
  axes = []
  for name, size in zip(names or (), shape):
    axis = table.get(name) if name is not None else None
    if axis is not None and size % mesh.shape[axis]:
      axis = None
    axes.append(axis)
  return PartitionSpec(*axes)


def param_shardings(model_or_state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedSharding for every variable of a model, optimizer or nnx.State, from its logical axis names
  (variables without names, such as the optimizer's step count, are replicated)."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

  def sharding(var):
    names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
    return NamedSharding(mesh, logical_to_mesh(names, var.shape, mesh, rules))

  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(tree, shardings, *, copy: bool = False):
  """Puts a pytree whose values every process holds in full (weights, replicated inputs) on the mesh.

  `shardings` may be a prefix of `tree` (e.g. one sharding per nnx.Variable). On several hosts each process
  builds only its own shards from its host copy (no transfer between hosts). copy: never alias the input
  buffers (for arrays that will be donated).
  """
  if jax.process_count() == 1:
    placed = jax.device_put(tree, shardings)
    # device_put(may_alias=False) still hands back the source buffer as the shard on the source's own device
    # when it replicates (jax 0.10): donated copies come from an explicit copy on the devices.
    return jax.tree.map(jnp.copy, placed) if copy else placed

  def put(sharding, subtree):
    def one(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, subtree)

  return jax.tree.map(put, shardings, tree)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """Places every variable of `model` (a module or an nnx.Optimizer) on `mesh` per its logical names (in
  place); returns it."""
  state = nnx.state(model)
  nnx.update(model, place(state, param_shardings(state, mesh, rules)))
  return model


def batch_spec() -> PartitionSpec:
  return PartitionSpec(MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, batch_spec())


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """This process's share of a global batch (global / process count), checked to split evenly over the
  mesh's batch axes."""
  processes = jax.process_count()
  shards = (mesh.shape[DATA] * mesh.shape[FSDP]) if mesh is not None else jax.device_count()
  if global_batch_size % processes or global_batch_size % shards:
    raise ValueError(f"global batch {global_batch_size} must divide by the process count {processes} and the "
                     f"{shards} batch shards of the mesh")
  return global_batch_size // processes


def host_local_to_global(batch, mesh: Mesh):
  """Pytree of this host's numpy arrays (leading dim = per-host batch) -> global jax.Arrays whose leading
  dimension is sharded over (data, fsdp); global batch = per-host batch x process count."""
  sharding = batch_sharding(mesh)
  shards = mesh.shape[DATA] * mesh.shape[FSDP]
  processes = jax.process_count()

  def to_global(path, x):
    x = np.asarray(x)
    if x.ndim == 0 or (x.shape[0] * processes) % shards:
      raise ValueError(f"batch leaf {jax.tree_util.keystr(path) or '<root>'} of shape {x.shape}: the leading "
                       f"(batch) dimension x {processes} processes must divide by the {shards} batch shards")
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * processes, *x.shape[1:]))

  return jax.tree_util.tree_map_with_path(to_global, batch)


def global_to_host_local(tree):
  """Inverse of host_local_to_global: each global array -> numpy of the rows this host holds (the whole
  array on one host). Arrays must be split only along the leading dimension (replicated is fine)."""

  def to_local(path, x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(x)
    rows = {}
    for shard in x.addressable_shards:
      if any(s != slice(None) for s in shard.index[1:]):
        raise ValueError(f"{jax.tree_util.keystr(path) or '<root>'}: sharded beyond the leading dimension "
                         f"({x.sharding}); use gather_to_host")
      rows.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(rows[k].data) for k in sorted(rows)], axis=0)

  return jax.tree_util.tree_map_with_path(to_local, tree)


def gather_to_host(tree) -> Any:
  """Every global array in full as numpy on every host (an all-gather across processes when needed)."""
  return jax.tree.map(lambda x: np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable
                      else np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
