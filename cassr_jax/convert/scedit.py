"""SCEdit tuner checkpoints (PyTorch .bin/.pth/.pt/.ckpt or .safetensors) -> our SCEditUNet tuners.

Key layouts (modelscope/scepter; see cassr_jax/models/scedit.py for the network):
  CSC  CSCTuners state dict, as LatentDiffusionSCEControl.save_pretrained writes it (the control_blocks
       ModuleList, so every key starts with "0.") and CSCTuners.init_from_ckpt reads it (dropping a leading
       "model." and "0."):
         [model.][control_blocks.][0.]pre_hint_blocks.{0,2,4,...,12}.{weight,bias}      3x3 convs
         ...dense_hint_blocks.{i}.1.{weight,bias}                                        (SiLU, conv) pairs
         ...lsc_tuner_blocks.{m}.tuner_op.ln{1,2}.{weight,bias}                          Linear layers
  SC   U-Net keys holding "lsc_identity" (LatentDiffusionSCETuning.save_pretrained):
         model.lsc_identity.{m}.tuner_op.ln{1,2}.{weight,bias}
       and the ms-swift SCETuning layout of the published SC checkpoints, which puts the adapter one level
       deeper: ...lsc_identity.{m}.scetuner_<adapter name>.tuner_op.ln{1,2}.{weight,bias}.
Keys are first normalised to the canonical names above (prefixes dropped), then loaded with the strict loader
and a rename map from our parameter names, so every missing, unexpected or mis-shaped key is reported.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from cassr_jax.convert.state_dict import CheckpointError, read_state_dict
from cassr_jax.convert.strict import export_torch_state, load_torch_state
from cassr_jax.models.scedit import SCEditUNet

_SC_KEY = re.compile(r"^(?:.*\.)?lsc_identity\.(\d+)\.(?:scetuner[^.]*\.)?tuner_op\.(ln[12]\.(?:weight|bias))$")
_CSC_PREFIXES = ("model.", "control_blocks.", "0.")


class _Tuners(nnx.Module):
  """View of an SCEditUNet's trained parts (shared, not copied), so the strict loader sees only them."""

  def __init__(self, model: SCEditUNet):
    self.tuners = model.tuners
    self.hint = model.hint


def scedit_rename(mode: str) -> Callable[[str], str]:
  """Our key (torch convention, e.g. "tuners.3.ln1.weight") -> SCEdit's canonical key."""
  tuner_prefix = "lsc_tuner_blocks" if mode == "csc" else "lsc_identity"

  def rename(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "tuners":                   # tuners.{m}.ln1.weight
      return f"{tuner_prefix}.{parts[1]}.tuner_op." + ".".join(parts[2:])
    if parts[:2] == ["hint", "pre_hint_blocks"]:  # SiLUs sit between the convs of an nn.Sequential
      return f"pre_hint_blocks.{2 * int(parts[2])}." + ".".join(parts[3:])
    if parts[:2] == ["hint", "dense_hint_blocks"]:  # Sequential(SiLU, conv)
      return f"dense_hint_blocks.{parts[2]}.1." + ".".join(parts[3:])
    raise KeyError(f"no SCEdit name for parameter {key!r}")

  return rename


def canonical_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops the wrapper prefixes of the SCEdit layouts (module docstring); other keys pass unchanged, so the
  strict loader reports them as unexpected."""
  out = {}
  for key, value in state_dict.items():
    match = _SC_KEY.match(key)
    if match:
      new = f"lsc_identity.{match.group(1)}.tuner_op.{match.group(2)}"
    else:
      new = key
      for prefix in _CSC_PREFIXES:
        if new.startswith(prefix):
          new = new[len(prefix):]
    if new in out:
      raise CheckpointError(f"SCEdit checkpoint: two keys map to {new!r} (the second is {key!r})")
    out[new] = value
  return out


def load_scedit_tuners(model: SCEditUNet, checkpoint: str | os.PathLike | Mapping[str, np.ndarray], *,
                       source: str | None = None) -> None:
  """Loads SCEdit tuner weights (file path or state dict) into `model`'s tuners / hint encoder, in place.

  The U-Net is untouched (convert SD's weights separately). Raises CheckpointError naming every missing,
  unexpected or mis-shaped key, with our parameter name beside SCEdit's.
  """
  if isinstance(checkpoint, Mapping):
    state_dict, source = checkpoint, source or "SCEdit state dict"
  else:
    source = source or os.fspath(checkpoint)
    state_dict = read_state_dict(checkpoint, prefer=("state_dict", "model"))
  mode = model.config.mode
  state_dict = canonical_keys(state_dict)
  try:
    load_torch_state(_Tuners(model), state_dict, source=f"{source} (SCEdit {mode.upper()} tuners)",
                     rename=scedit_rename(mode))
  except CheckpointError as e:
    other = "csc" if mode == "sc" else "sc"
    if state_dict and all(k not in state_dict for k in _expected_keys(model)) and any(
        k in state_dict for k in _expected_keys(model, other)):
      raise CheckpointError(f"{source}: this is an SCEdit {other.upper()} checkpoint, but the model is "
                            f"configured with mode={mode!r}") from e
    raise


def _expected_keys(model: SCEditUNet, mode: str | None = None) -> set[str]:
  rename = scedit_rename(mode or model.config.mode)
  return {rename(k) for k in export_torch_state(_Tuners(model))}


def export_scedit_tuners(model: SCEditUNet) -> dict[str, np.ndarray]:
  """The tuner weights under SCEdit's canonical names and torch layouts (inverse of load_scedit_tuners)."""
  return export_torch_state(_Tuners(model), rename=scedit_rename(model.config.mode))
