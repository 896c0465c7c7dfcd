"""Strict loading of a PyTorch state dict into an NNX model whose attribute names mirror the torch ones.

A parameter at NNX path ("down_blocks", 0, "resnets", 1, "conv1", "kernel") is expected under the torch key
"down_blocks.0.resnets.1.conv1.weight". Layout changes are implied by the leaf name and rank:
  kernel, rank 4: torch Conv2d OIHW  -> HWIO          kernel, rank 2: torch Linear (out, in) -> (in, out)
  scale (norms) <- weight                             embedding <- weight
Models whose names differ from their source pass `rename` (our dotted key -> source key).
Every missing, unexpected and shape-mismatched key is collected and reported in one error.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_jax.convert.state_dict import CheckpointError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def our_key(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def torch_key(path: tuple) -> str:
  """Source key of one of our parameters (diffusers naming)."""
  *head, leaf = (str(p) for p in path)
  return ".".join(head + [_LEAF_TO_TORCH.get(leaf, leaf)])


def torch_to_ours(array: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
  """Converts the layout of one torch tensor to ours (see module docstring)."""
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if leaf == "kernel" and array.ndim == 2 and target_ndim == 2:
    return np.transpose(array, (1, 0))
  if leaf == "kernel" and array.ndim == 2 and target_ndim == 4:  # Linear stored where we use a 1x1 conv
    return np.transpose(array, (1, 0))[None, None]
  return array


def ours_to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
  """Inverse of torch_to_ours for the usual layouts (used by tests and exports)."""
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if leaf == "kernel" and array.ndim == 2:
    return np.transpose(array, (1, 0))
  return array


def _format_problems(source: str, missing, unexpected, mismatched) -> str:
  lines = [f"{source}: checkpoint does not match the model"]
  for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("shape mismatches", mismatched)):
    if items:
      lines.append(f"  {len(items)} {title}:")
      lines.extend(f"    {item}" for item in items)
  return "\n".join(lines)


def load_torch_state(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint",
                     rename: Callable[[str], str] | None = None,
                     ignore_unexpected: Iterable[str] = ()) -> None:
  """Copies `state_dict` into `model`'s nnx.Param variables in place, strictly.

  rename: maps our dotted source-convention key (torch_key of the path) to the checkpoint key.
  ignore_unexpected: regexes of checkpoint keys that are allowed to be left unused (buffers such as
  position_ids).
  """
  params = nnx.state(model, nnx.Param)
  flat = list(nnx.to_flat_state(params))
  ignore = [re.compile(p) for p in ignore_unexpected]
  used, missing, mismatched, updates = set(), [], [], []
  for path, var in flat:
    key = torch_key(path)
    if rename is not None:
      key = rename(key)
    if key not in state_dict:
      missing.append(f"{key} (ours: {our_key(path)}, shape {tuple(var.shape)})")
      continue
    used.add(key)
    array = torch_to_ours(np.asarray(state_dict[key]), str(path[-1]), len(var.shape))
    if tuple(array.shape) != tuple(var.shape):
      mismatched.append(f"{key}: checkpoint {tuple(np.shape(state_dict[key]))} -> {tuple(array.shape)}, "
                        f"model expects {tuple(var.shape)}")
      continue
    updates.append((var, array))
  unexpected = sorted(k for k in state_dict if k not in used and not any(p.fullmatch(k) for p in ignore))
  if missing or unexpected or mismatched:
    raise CheckpointError(_format_problems(source, missing, unexpected, mismatched))
  for var, array in updates:
    var.set_value(jnp.asarray(array, dtype=var.get_value().dtype))
  nnx.update(model, params)


def export_torch_state(model: nnx.Module, rename: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
  """Our parameters as a torch-layout state dict (inverse of load_torch_state)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key = torch_key(path)
    out[rename(key) if rename else key] = ours_to_torch(np.asarray(var.get_value()), str(path[-1]))
  return out
