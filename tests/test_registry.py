"""The shared lazy registry: built-ins resolve on first use, user entries register, errors name the entry."""
import sys

import pytest

from cassr_jax import registry
from cassr_jax.models import ModelKind


def test_builtin_resolves_lazily(monkeypatch):
  reg = registry.Registry("thing", {"json_dumps": "json:dumps"})
  monkeypatch.delitem(sys.modules, "json", raising=False)
  assert "json_dumps" in reg and reg.names() == ["json_dumps"]
  assert "json" not in sys.modules  # listing imports nothing
  import json  # pylint: disable=import-outside-toplevel
  assert reg.get("json_dumps") is json.dumps


def test_register_and_errors():
  reg = registry.Registry("sampler", {"ghost": "cassr_jax.no_such_module:X"})
  reg.register("mine", 42)
  assert reg.get("mine") == 42 and reg.names() == ["ghost", "mine"]
  with pytest.raises(ValueError, match=r"unknown sampler 'nope'; known: \['ghost', 'mine'\]"):
    reg.get("nope")
  with pytest.raises(ValueError, match="sampler 'ghost' is listed but its module cassr_jax.no_such_module"):
    reg.get("ghost")


@pytest.mark.parametrize("model_type", registry.MODELS.names())
def test_every_model_type_resolves(model_type):
  kind = registry.MODELS.get(model_type)
  assert isinstance(kind, ModelKind) and callable(kind.build)


def test_activation_builtins_resolve():
  from cassr_jax.activation import build_activation  # pylint: disable=import-outside-toplevel
  assert build_activation("bicubic", scale=2).scale == 2
  assert registry.ACTIVATIONS.get("rrdbnet").name == "rrdbnet"
