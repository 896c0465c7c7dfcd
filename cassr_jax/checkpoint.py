"""Saving and loading our models: orbax weights + the model config as JSON, loadable with one call.

Layout of a model directory:
  model.json   {"model_type": "unet", "config": {...}, "param_dtype": "float32"}
  params/      orbax StandardCheckpointer tree of the nnx.Param state
Writes go to a temporary sibling and are renamed into place, so a crash never leaves a half-written model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import config_from_dict
from cassr_jax.nn.layers import FP32, Policy
from cassr_jax.registry import MODELS

MODEL_FILE = "model.json"
PARAMS_DIR = "params"


@contextlib.contextmanager
def atomic_directory(directory: str):
  """Yields a temporary sibling of `directory` to fill; on success it replaces `directory` whole, on any
  error it is removed and `directory` stays as it was."""
  parent = os.path.dirname(os.path.abspath(directory)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(directory)) + ".tmp-", dir=parent)
  try:
    yield tmp
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_model(directory: str, model: nnx.Module, model_type: str, config) -> None:
  """Writes model.json and the orbax params of `model` to `directory` (replacing it atomically)."""
  MODELS.get(model_type)
  with atomic_directory(directory) as tmp:
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    meta = {"model_type": model_type, "config": dataclasses.asdict(config),
            "param_dtype": str(leaves[0].dtype) if leaves else "float32"}
    with open(os.path.join(tmp, MODEL_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(os.path.abspath(tmp), PARAMS_DIR), nnx.to_pure_dict(params))
    checkpointer.wait_until_finished()


def read_model_meta(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MODEL_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not a cassr_jax model directory (no {MODEL_FILE})")
  with open(path) as f:
    return json.load(f)


def load_model(directory: str, *, policy: Policy | None = None, **runtime_options) -> nnx.Module:
  """Builds the model described by `directory`/model.json and restores its weights.

  policy: dtype policy; default keeps the saved parameter dtype with compute in that dtype.
  runtime_options: passed to the model constructor (for example attention="blockwise").
  """
  meta = read_model_meta(directory)
  kind = MODELS.get(meta["model_type"])
  config = config_from_dict(kind.config_cls, meta["config"])
  if policy is None:
    saved = jnp.dtype(meta.get("param_dtype", "float32"))
    policy = Policy(saved, saved)
  abstract = eval_shape(lambda: kind.build(config, policy=policy, rngs=nnx.Rngs(0), **runtime_options))
  graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
  # An explicit (local, single-device) sharding: without one orbax refuses to restore in multi-process runs.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=local),
                        nnx.to_pure_dict(abstract_params))
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), PARAMS_DIR), target)
  nnx.replace_by_pure_dict(abstract_params, restored)
  model = nnx.merge(graphdef, abstract_params, rest)
  return model


def build_model(model_type: str, config, *, policy: Policy = FP32, seed: int = 0, **runtime_options):
  return MODELS.get(model_type).build(config, policy=policy, rngs=nnx.Rngs(seed), **runtime_options)
