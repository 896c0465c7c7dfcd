"""Logical axis names map onto a (data, fsdp) mesh of 8 CPU devices; sharded forward equals unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_fixtures import TINY_UNET
from cassr_jax import parallel
from cassr_jax.models.cassr_unet import CasSRConfig, CasSRUNet
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from conftest import jit_call, relative_max_error


def test_every_parameter_has_logical_names():
  config = CasSRConfig.from_unet(UNetConfig.from_diffusers(TINY_UNET))
  model = nnx.eval_shape(lambda: CasSRUNet(config, rngs=nnx.Rngs(0)))
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
