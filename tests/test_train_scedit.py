"""configs/scedit_stage1.py on the tiny random model: the training loop trains the SCEdit tuners alone (the SD
U-Net stays bit-identical) and the run exports to a directory that the "scedit" activation loads and runs."""
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from cassr_jax import checkpoint
from cassr_jax.config import ConfigError, validate_config
from cassr_jax.models import trainable_filter
from cassr_jax.train import checkpointing, export, loop
from cassr_jax.train.components import build_components
from test_configs import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_scedit(images=None):
  """The tiny config (random model, CPU sizes) with scedit_stage1's model and activation sections."""
  config = load_config_file("tiny", ROOT)
  stage1 = load_config_file("scedit_stage1", ROOT)
  config.model, config.activation = stage1.model, stage1.activation
  config.data.sources = f"folder:{images or '/unused'}"
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  folder = tmp_path_factory.mktemp("imgs")
  y, x = np.mgrid[0:80, 0:80] / 80.0
  for i in range(8):
    img = np.stack([np.sin(x * (i + 1) * 3), np.cos(y * (i + 2) * 2), x * y], -1) * 0.5 + 0.5
    Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
  config = tiny_scedit(str(folder))
  config.mesh.fsdp = 2
  config.train.steps = 2
  config.train.val_every = 0  # the SCEdit grid compiles one more sampling program: see the slow test below
  workdir = str(tmp_path_factory.mktemp("scedit_run"))
  return workdir, config, loop.train_and_evaluate(config, workdir)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_loop_trains_only_the_tuners(run):
  workdir, config, history = run
  assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
  fresh = build_components(config, model_only=True).model
  initial = nnx.state(fresh, trainable_filter(fresh))
  paths = list(checkpointing.flatten(initial))
  assert paths and all(p.startswith(("tuners.", "hint.")) for p in paths)
  saver = checkpointing.Checkpointer(workdir, keep=1, read_only=True)
  assert saver.all_steps() == [2]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), initial)
  trained = saver.restore_item(2, "params", abstract)
  saver.close()
  changed = [not np.array_equal(a, b) for a, b in zip(leaves(trained), leaves(initial))]
  assert sum(changed) >= 0.9 * len(changed), (sum(changed), len(changed))
  for tuner in trained["tuners"].values():  # the zero-initialised output layers started to learn
    assert np.abs(np.asarray(tuner["ln2"]["kernel"])).max() > 0

  with pytest.raises(ValueError, match="model.kind='scedit'"):
    export.pipeline_from_run(workdir)


@pytest.mark.slow  # one more sampling program to compile (the CasSR grid is checked in test_train_loop)
def test_validation_grid_samples_scedit(run, tmp_path):
  _, config, _ = run
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.steps = config.train.val_every = 1
  loop.train_and_evaluate(config, str(tmp_path))
  grid = np.asarray(Image.open(tmp_path / "images" / "val_00000001.png"))
  assert grid.shape == (2 * 64, 4 * 64, 3)  # LR | reference (= LR for SCEdit) | sample | HR
  lr_column, sample_column = grid[:, :64].astype(float), grid[:, 128:192].astype(float)
  assert np.abs(sample_column - lr_column).mean() > 2.0 and sample_column.std() > 2.0


def test_export_loads_as_the_scedit_activation(run, tmp_path):
  workdir, config, _ = run
  out = str(tmp_path / "scedit_export")
  export.export_run(workdir, out)
  assert sorted(os.listdir(out)) == ["activation.json", "scedit", "scheduler_config.json", "text_encoder",
                                     "tokenizer", "vae"]
  # The exported model: the trained tuners around the untouched (bit-identical) SD U-Net.
  model = checkpoint.load_model(os.path.join(out, export.SCEDIT_DIR), attention="xla")
  fresh = build_components(config, model_only=True).model
  assert all(np.array_equal(a, b) for a, b in zip(leaves(nnx.state(model.unet, nnx.Param)),
                                                   leaves(nnx.state(fresh.unet, nnx.Param))))
  trained, _ = checkpointing.load_trained_model(workdir)
  assert all(np.array_equal(a, b) for a, b in zip(leaves(nnx.state(model, trainable_filter(model))),
                                                   leaves(nnx.state(trained, trainable_filter(trained)))))

  act = export.load_activation(out)
  assert act.name == "scedit" and act.scale == 4 and act.steps == config.sample.steps
  from_run = export.activation_from_run(workdir)  # the same activation straight from the run (not run here)
  settings = lambda a: (a.name, a.scale, a.steps, a.sampler, a.guidance_scale, a.seed)
  assert settings(from_run) == settings(act)
  lr = np.random.default_rng(0).random((1, 16, 16, 3)).astype(np.float32)
  ref = np.asarray(act(lr))
  assert ref.shape == (1, 64, 64, 3) and np.all(np.isfinite(ref))
  assert 0.0 <= ref.min() and ref.max() <= 1.0 and ref.std() > 1e-3


def test_scedit_config_rules(tmp_path):
  config = tiny_scedit(str(tmp_path))
  validate_config(config, device_count=8, process_count=1)
  config.activation.name = "bicubic"
  config.model.multiple_attention = True             # a CasSR switch
  config.init.controlnet = str(tmp_path)
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  message = str(e.value)
  for fragment in ("takes no stage-1 reference", "unknown config keys ['multiple_attention']",
                   "model.kind='scedit' has no ControlNet"):
    assert fragment in message
  cassr = load_config_file("tiny", ROOT)
  cassr.data.sources = f"folder:{tmp_path}"
  cassr.activation.name = "none"
  cassr.model.kind = "unet"
  with pytest.raises(ConfigError) as e:
    validate_config(cassr)
  assert "only for model.kind='scedit'" in str(e.value) and "model.kind='unet'" in str(e.value)
