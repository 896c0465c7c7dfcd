"""Every config file loads, overrides what it says, and stays consistent."""
import importlib

import pytest

from configs import base


@pytest.mark.parametrize("name", ["base", "a100x8", "tiny"])
def test_config_loads(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.train.learning_rate == 5e-4
  assert config.model.attention in ("auto", "xla", "cudnn", "blockwise")
  assert config.text.prompt == base.GENERAL_PROMPT
  assert config.data.scale == 4


def test_overrides_differ_from_base():
  assert importlib.import_module("configs.a100x8").get_config().train.batch_size == 32
  tiny = importlib.import_module("configs.tiny").get_config()
  assert tiny.data.crop_size == 64 and tiny.activation.name == "bicubic"
  assert base.get_config().data.crop_size == 512
