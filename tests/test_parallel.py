"""Logical axis names map onto a (data, fsdp) mesh of 8 CPU devices; sharded forward equals unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cassr_fixtures import TINY_UNET
from cassr_jax import parallel
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import trainable_filter
from cassr_jax.models.cassr_unet import CasSRConfig, CasSRUNet
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from conftest import jit_call, relative_max_error


def test_every_parameter_has_logical_names():
  config = CasSRConfig.from_unet(UNetConfig.from_diffusers(TINY_UNET))
  model = eval_shape(lambda: CasSRUNet(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  unnamed = [p for p, v in flat if not v.get_metadata().get("out_sharding")]
  assert len(flat) > 100 and not unnamed


def test_sharded_forward_matches_single_device(rng):
  assert len(jax.devices()) == 8
  # The plain U-Net keeps the compile short; CasSR's parameters use the same constructors (test above).
  model = UNet2DConditionModel(UNetConfig.from_diffusers(TINY_UNET), attention="xla", rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32)
  t = jnp.arange(8) * 100
  ctx = jnp.asarray(rng.standard_normal((8, 5, 24)), jnp.float32)
  expected = jit_call(model, x, t, ctx)

  mesh = parallel.make_mesh(fsdp=4)
  parallel.shard_model(model, mesh)
  kernel = model.down_blocks[0].resnets[0].conv1.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, parallel.FSDP)
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 4
  batch = parallel.batch_sharding(mesh)
  args = [jax.device_put(a, batch) for a in (x, t, ctx)]
  got = jit_call(model, *args)
  assert relative_max_error(got, expected) <= 1e-5
  assert np.asarray(got).shape == expected.shape


def test_mesh_from_config_sizes_and_errors():
  mesh = parallel.make_mesh_from_config({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2} and mesh.devices.size == 8
  assert dict(parallel.make_mesh_from_config(None).shape) == {"data": 8, "fsdp": 1}
  assert dict(parallel.make_mesh_from_config({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4}
  assert dict(parallel.make_mesh(fsdp=8).shape) == {"data": 1, "fsdp": 8}
  for bad in ({"data": 3}, {"data": 2, "fsdp": 2}, {"data": -1, "fsdp": -1}, {"fsdp": 0}):
    with pytest.raises(ValueError, match="mesh config"):
      parallel.make_mesh_from_config(bad)
  assert parallel.rules_from_config({}) == parallel.DEFAULT_RULES
  rules = parallel.rules_from_config({"rules": [["embed_out", None], ["embed_in", "fsdp"]]})
  assert rules == (("embed_out", None), ("embed_in", "fsdp"))
  with pytest.raises(ValueError, match="mesh axes"):
    parallel.rules_from_config({"rules": [["embed_out", "model"]]})


def test_host_local_batch_round_trip(rng):
  mesh = parallel.make_mesh_from_config({"fsdp": 2})
  local = {"hr": rng.standard_normal((8, 4, 4, 3)).astype(np.float32), "t": np.arange(8, dtype=np.int32)}
  batch = parallel.host_local_to_global(local, mesh)
  assert batch["hr"].shape == (8, 4, 4, 3) and batch["hr"].sharding.spec == parallel.batch_spec()
  assert len({s.device for s in batch["t"].addressable_shards}) == 8
  back = parallel.global_to_host_local(batch)
  np.testing.assert_array_equal(back["hr"], local["hr"])
  np.testing.assert_array_equal(parallel.gather_to_host(batch)["t"], local["t"])
  assert parallel.local_batch_size(16, mesh) == 16
  with pytest.raises(ValueError, match=r"\['t'\]"):
    parallel.host_local_to_global({"t": np.arange(6)}, mesh)
  with pytest.raises(ValueError, match="global batch"):
    parallel.local_batch_size(12, mesh)


def test_optimizer_state_sharded_like_its_parameters():
  config = CasSRConfig.from_unet(UNetConfig.from_diffusers(TINY_UNET))

  def build():
    model = CasSRUNet(config, attention="xla", rngs=nnx.Rngs(0))
    return nnx.Optimizer(model, optax.adam(1e-3), wrt=trainable_filter(model)), model

  optimizer, model = eval_shape(build)
  mesh = parallel.make_mesh_from_config({"data": -1, "fsdp": 4})
  rules = parallel.rules_from_config({"rules": [["embed_out", "fsdp"], ["embed_in", "data"]]})
  params = dict(nnx.to_flat_state(parallel.param_shardings(nnx.state(model, nnx.Param), mesh, rules)))
  trainable = dict(nnx.to_flat_state(nnx.state(model, trainable_filter(model))))
  opt = nnx.to_flat_state(parallel.param_shardings(nnx.state(optimizer, nnx.OptState), mesh, rules))
  moments = {}
  for path, sharding in opt:
    # opt_state paths: ("opt_state", <adam chain index>, "mu" | "nu", *parameter path)
    if "mu" in path or "nu" in path:
      i = path.index("mu") if "mu" in path else path.index("nu")
      moments.setdefault(path[i], {})[path[i + 1:]] = sharding.spec
    else:
      assert sharding.spec == jax.sharding.PartitionSpec(), path  # step and Adam's count: replicated
  assert set(moments) == {"mu", "nu"}
  for name, specs in moments.items():
    assert set(specs) == set(trainable), name  # trainable leaves only
    assert all(specs[p] == params[p].spec for p in specs)
  assert sum(spec != jax.sharding.PartitionSpec(*[None] * len(spec)) for spec in moments["mu"].values()) > 50
