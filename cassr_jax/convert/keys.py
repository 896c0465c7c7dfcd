"""Source key names -> the current diffusers / transformers names our models use (before a strict load).

One place for the naming quirks of checkpoints in the wild:
  * CLIP text encoders: transformers < 5.6 (and SD-1.x single files) nest the weights under "text_model.",
    newer versions do not; old checkpoints also store the `position_ids` buffer, which is not a weight.
  * VAEs: pre-0.14 diffusers (SD-1.5 on the hub, some fine-tunes) name the mid-block attention
    query/key/value/proj_attn, and LDM files store those projections as 1x1 convolutions.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.convert.strict import load_torch_state

CLIP_PREFIX = "text_model."
# Regex (full match) of the CLIP position_ids buffer, with or without the "text_model." level.
CLIP_POSITION_IDS = r"(text_model\.)?embeddings\.position_ids"


def with_clip_prefix(key: str) -> str:
  return key if key.startswith(CLIP_PREFIX) else CLIP_PREFIX + key


def without_clip_prefix(key: str) -> str:
  return key[len(CLIP_PREFIX):] if key.startswith(CLIP_PREFIX) else key


def clip_aliases(key: str) -> Sequence[str]:
  """Candidate source keys for one of our CLIP keys: as is, then with the "text_model." level toggled."""
  return (key, without_clip_prefix(key) if key.startswith(CLIP_PREFIX) else with_clip_prefix(key))


def is_clip_position_ids(key: str) -> bool:
  return re.fullmatch(CLIP_POSITION_IDS, key) is not None


def load_clip_state_dict(model, state_dict: Mapping[str, np.ndarray], *,
                         source: str = "CLIP text encoder checkpoint") -> None:
  """Strictly loads a transformers CLIPTextModel state dict, with or without the "text_model." prefix."""
  prefixed = [k for k in state_dict if k.startswith(CLIP_PREFIX)]
  if prefixed and len(prefixed) != len(state_dict):
    others = sorted(k for k in state_dict if not k.startswith(CLIP_PREFIX))[:5]
    raise CheckpointError(f"{source}: mixes keys with and without the {CLIP_PREFIX!r} prefix (e.g. {others})")
  rename = None if prefixed else without_clip_prefix
  load_torch_state(model, state_dict, source=source, rename=rename, ignore_unexpected=[CLIP_POSITION_IDS])


_OLD_VAE_ATTENTION_KEY = re.compile(r"^(.*mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_vae_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps old VAE attention names to the current ones; 1x1-conv attention weights become linear weights."""
  out = {}
  for key, value in state_dict.items():
    match = _OLD_VAE_ATTENTION_KEY.match(key)
    if match:
      prefix, name, leaf = match.groups()
      key = f"{prefix}{_OLD_TO_NEW[name]}.{leaf}"
    if ".mid_block.attentions." in key and key.endswith(".weight") and np.ndim(value) == 4:
      if tuple(np.shape(value)[2:]) != (1, 1):
        raise CheckpointError(f"{key}: expected a linear or 1x1 conv attention weight, got shape "
                              f"{tuple(np.shape(value))}")
      value = np.asarray(value)[:, :, 0, 0]
    out[key] = value
  return out


def load_vae_state_dict(model, state_dict: Mapping[str, np.ndarray], *, source: str = "VAE checkpoint") -> None:
  """Strictly loads a diffusers AutoencoderKL state dict (old or new attention names) into `model`."""
  load_torch_state(model, normalize_vae_state_dict(state_dict), source=source)
