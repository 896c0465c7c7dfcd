"""Config files load from any working directory, override what they say, and validate with one clear message."""
import importlib.util
import os
import subprocess
import sys

import pytest

from cassr_jax.config import GENERAL_PROMPT, ConfigError, base_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> its device count
CONFIGS = {"base": 4, "a100x8": 8, "h100x8": 8, "tpu_v5e_pod": 32, "tiny": 8, "scedit_stage1": 8}


def load_config_file(name, cwd):
  """Loads configs/<name>.py by path the way config_flags does, from another working directory."""
  old = os.getcwd()
  os.chdir(cwd)
  try:
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  finally:
    os.chdir(old)


@pytest.fixture
def images(tmp_path):
  folder = tmp_path / "imgs"
  folder.mkdir()
  return str(folder)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_files_load_from_any_directory_and_validate(name, tmp_path, images):
  config = load_config_file(name, tmp_path)
  assert config.train.learning_rate in (5e-4, 1e-3)
  assert config.text.prompt == GENERAL_PROMPT
  assert config.data.scale == 4
  assert "batch_size" not in config.data  # the per-host batch is derived, never copied
  config.data.sources = f"folder:{images}"
  validate_config(config, device_count=CONFIGS[name], process_count=1)


def test_overrides_differ_from_base(tmp_path):
  assert load_config_file("a100x8", tmp_path).train.batch_size == 32
  assert load_config_file("tpu_v5e_pod", tmp_path).mesh.fsdp == 8
  tiny = load_config_file("tiny", tmp_path)
  assert tiny.data.crop_size == 64 and tiny.activation.name == "bicubic"
  assert tiny.init.random == "tiny" and not tiny.init.pretrained
  assert base_config().data.crop_size == 512


def test_paper_configs_name_their_missing_data(tmp_path):
  config = load_config_file("a100x8", tmp_path)
  with pytest.raises(ConfigError, match="DIV2K_train_HR_sub.*no such directory"):
    validate_config(config)


def test_every_problem_in_one_message(images):
  config = base_config()
  config.data.sources = f"folder:{images}"
  config.train.lr_schedule = "cosinus"
  config.train.batch_size = 6
  config.runtime.attention = "flash"
  config.init.random = "tiny"                        # and pretrained is still set
  config.model.multiple_attention = False
  config.model.residual_add = False
  with pytest.raises(ConfigError) as e:
    validate_config(config, device_count=4, process_count=1)
  message = str(e.value)
  for fragment in ("train.lr_schedule='cosinus'", "runtime.attention='flash'", "exactly one of init.pretrained",
                   "multiple_attention and residual_add are both off", "multiple of the 4 devices"):
    assert fragment in message


def test_unknown_keys_are_named(images):
  config = base_config()
  config.data.sources = f"folder:{images}"
  config.train.stepz = 3
  with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
    validate_config(config)
  config = base_config()
  config.data.sources = f"folder:{images}"
  config.model.multi_attention = True
  with pytest.raises(ConfigError, match=r"unknown config keys \['multi_attention'\]"):
    validate_config(config)
  config = base_config()
  config.data.sources = f"folder:{images}"
  config.data.batch_size = 4
  with pytest.raises(ConfigError, match="train.batch_size is the GLOBAL batch"):
    validate_config(config)
  config = base_config()
  config.data.sources = f"folder:{images}"
  config.init.pretrained = "./no/such/weights"
  config.activation.tile = 9
  config.activation.colour = "red"
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  assert "no/such/weights" in str(e.value) and "unknown options ['colour']" in str(e.value)


def test_cli_reports_a_bad_config_before_compiling(tmp_path, images):
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
         os.path.join(ROOT, "configs", "tiny.py"), f"--config.data.sources=folder:{images}",
         "--config.train.lr_schedule=cosinus", "--workdir", str(tmp_path / "run")]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "train.lr_schedule='cosinus'" in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()
