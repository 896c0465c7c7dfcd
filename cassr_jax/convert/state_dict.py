"""Reading PyTorch-side checkpoints as {key: numpy array}.

safetensors files are parsed directly (header + memory map), so they never need torch and bf16 tensors
stay bf16 (ml_dtypes). Pickle checkpoints (.bin, .pt, .pth, .ckpt) are read with torch.load(weights_only=True):
arbitrary pickles are refused by torch's restricted unpickler.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint file is unreadable, or its contents do not fit the model."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays (memory-mapped, read-only) without torch."""
  try:
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      if header_len <= 0 or header_len > os.path.getsize(path):
        raise CheckpointError(f"{path}: not a safetensors file (bad header length {header_len})")
      header = json.loads(f.read(header_len))
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    if end > data.shape[0]:
      raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
    out[name] = data[start:end].view(dtype).reshape(info["shape"])
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def read_pickle_checkpoint(path: str, prefer: Sequence[str] = ("state_dict",)) -> dict[str, np.ndarray]:
  """Reads a torch pickle checkpoint with weights_only=True; unwraps the first key of `prefer` found."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"{path}: reading pickle checkpoints needs PyTorch (pip install 'cassr_jax[torch]'); "
        "safetensors files do not") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
    raise CheckpointError(
        f"{path}: could not be read as a weights-only torch checkpoint "
        f"(arbitrary pickles are refused): {type(e).__name__}: {e}") from e
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
  for key in prefer:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  out = {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
  if not out:
    raise CheckpointError(f"{path}: contains no tensors (top-level keys: {sorted(obj)[:10]})")
  return out


def read_state_dict(path: str, prefer: Sequence[str] = ("state_dict",)) -> dict[str, np.ndarray]:
  """{key: array} from a .safetensors or torch pickle file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(SAFETENSORS_SUFFIXES):
    return read_safetensors(path)
  if path.endswith(PICKLE_SUFFIXES):
    return read_pickle_checkpoint(path, prefer)
  raise CheckpointError(
      f"{path}: unknown checkpoint type; expected one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}")


def read_sharded_dir(directory: str, stem: str) -> dict[str, np.ndarray]:
  """Reads `stem`.safetensors / `stem`.bin or their sharded index (diffusers/transformers layout)."""
  for suffix in (".safetensors", ".bin"):
    single = os.path.join(directory, stem + suffix)
    if os.path.isfile(single):
      return read_state_dict(single)
    index = single + ".index.json"
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      out = {}
      for shard in shards:
        out.update(read_state_dict(os.path.join(directory, shard)))
      return out
  raise CheckpointError(
      f"{directory}: no {stem}.safetensors or {stem}.bin (nor a sharded index) found")
