"""Training checkpoints (orbax CheckpointManager) and loading a trained model from a run directory.

Run directory layout:
  config.json           the run config (cassr_jax.config), so inference can rebuild the model from it
  checkpoints/<step>/   items params, opt, [ema], meta (step, rng) and data (the grain iterator position)
  pretrained/           converted SD weights when init.pretrained was not converted yet
  tensorboard/, images/, metrics.jsonl   logs (process 0)
Only trained weights are saved; the frozen ones come from config.init. Saves are asynchronous and atomic
(orbax writes a temporary directory and renames it when complete), so a crash never leaves a partial step.
"""
from __future__ import annotations

import json
import os
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from cassr_jax.config import config_from_json_dict, config_to_json_dict

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEMS = ("params", "opt", "ema")


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten(tree) -> dict:
  """A pytree as {"a.b.c": leaf} (stable string keys for orbax)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(e) for e in path): leaf for path, leaf in leaves}


def unflatten_like(template, flat: dict):
  """Inverse of flatten, with the structure of `template`."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  values = []
  for path, _ in leaves:
    name = ".".join(_key_name(e) for e in path)
    if name not in flat:
      raise KeyError(f"checkpoint has no entry {name!r}")
    values.append(flat[name])
  return jax.tree_util.tree_unflatten(treedef, values)


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """<workdir>/config.json, written atomically."""
  os.makedirs(workdir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".json", dir=workdir)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(config_to_json_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_run_config(run_dir: str) -> ml_collections.ConfigDict:
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{run_dir}: not a training run directory (no {CONFIG_FILE})")
  with open(path) as f:
    return config_from_json_dict(json.load(f))


class Checkpointer:
  """Async orbax saves of the train state and the data iterator, keep-last-N, restore of the latest step."""

  def __init__(self, workdir: str, *, keep: int, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, data_iterator=None, *, force: bool = True) -> None:
    from cassr_jax.data import pipeline  # pylint: disable=import-outside-toplevel

    items = {name: ocp.args.StandardSave(flatten(state[name])) for name in STATE_ITEMS if name in state}
    items["meta"] = ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]})
    if data_iterator is not None:
      items["data"] = pipeline.orbax_save_args(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: dict, data_iterator=None) -> dict:
    """The state saved at `step` (placed per the shardings in `abstract_state`); the iterator in place."""
    from cassr_jax.data import pipeline  # pylint: disable=import-outside-toplevel

    items = {name: ocp.args.StandardRestore(flatten(abstract_state[name]))
             for name in STATE_ITEMS if name in abstract_state}
    items["meta"] = ocp.args.StandardRestore({"step": abstract_state["step"], "rng": abstract_state["rng"]})
    if data_iterator is not None:
      items["data"] = pipeline.orbax_restore_args(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = {name: unflatten_like(abstract_state[name], restored[name])
             for name in STATE_ITEMS if name in abstract_state}
    state["step"], state["rng"] = restored["meta"]["step"], restored["meta"]["rng"]
    return state

  def restore_item(self, step: int, name: str, abstract) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(
        flatten(abstract))}))
    return unflatten_like(abstract, restored[name])

  def item_names(self, step: int) -> list[str]:
    return sorted(os.listdir(os.path.join(self.directory, str(step))))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_trained_model(run_dir: str, step: int | None = None, *, ema: bool = True):
  """(the run's model - CasSRUNet, or SCEditUNet for model.kind "scedit" - with the trained weights of `step`
  (default: the latest), the run config).

  ema=True takes the EMA weights when the run kept them (train.ema_decay > 0), else the trained weights.
  Frozen weights come from the run's init (converted weights are looked up in <run_dir>/pretrained).
  """
  from cassr_jax.models import trainable_filter  # pylint: disable=import-outside-toplevel
  from cassr_jax.train.components import build_components  # pylint: disable=import-outside-toplevel

  config = read_run_config(run_dir)
  checkpointer = Checkpointer(run_dir, keep=1, read_only=True)
  step = checkpointer.latest_step() if step is None else int(step)
  if step is None or step not in checkpointer.all_steps():
    raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step} (saved: {checkpointer.all_steps()})")
  model = build_components(config, run_dir, model_only=True).model
  params = nnx.state(model, trainable_filter(model))
  name = "ema" if ema and "ema" in checkpointer.item_names(step) else "params"
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  restored = checkpointer.restore_item(step, name, abstract)
  nnx.update(model, restored)
  checkpointer.close()
  return model, config
