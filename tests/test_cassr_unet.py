"""CasSR U-Net: equals SD + ControlNet while the new attentions are untrained, trains what it should."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from cassr_fixtures import (SD_LIKE_UNET, TINY_UNET, nhwc_to_nchw, random_torch_pair,
                            state_dict_numpy)
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import frozen_filter, trainable_filter
from cassr_jax import checkpoint
from cassr_jax.convert.strict import load_torch_state
from cassr_jax.models.cassr_unet import (CasSRConfig, CasSRUNet, cassr_from_pretrained)
from cassr_jax.models.controlnet import ControlNetConfig
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from cassr_jax.nn.layers import Policy
from conftest import jit_call, relative_max_error


def _inputs(rng, batch=2, latent=8):
  x = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
  t = np.array([5, 600][:batch])
  ctx = rng.standard_normal((batch, 5, 24)).astype(np.float32)
  lr_up = rng.random((batch, 8 * latent, 8 * latent, 3)).astype(np.float32)
  ref = rng.random((batch, 8 * latent, 8 * latent, 3)).astype(np.float32)
  return [jnp.asarray(a) for a in (x, t, ctx, lr_up, ref)]


@pytest.fixture(scope="module")
def sd_like():
  """Torch U-Net + ControlNet with random weights and our CasSR (untrained attention) holding the same."""
  tu, tc = random_torch_pair(SD_LIKE_UNET, seed=1)
  config = CasSRConfig(unet=UNetConfig.from_diffusers(dict(tu.config)),
                       controlnet=ControlNetConfig.from_diffusers(dict(tc.config)))
  model = CasSRUNet(config, attention="xla", rngs=nnx.Rngs(0))
  load_torch_state(model.unet, state_dict_numpy(tu), source="unet")
  load_torch_state(model.controlnet, state_dict_numpy(tc), source="controlnet")
  return tu, tc, model


def test_nine_attention_slots_read_matching_skips(sd_like):
  _, _, model = sd_like
  assert len(model.slots) == 3 * 2  # 3 cross-attention up levels x (layers_per_block + 1)
  # Each slot reads the skip its up-block layer consumes: same channels as the ControlNet feature there.
  for (i, j, k), ma in zip(model.slots, model.multi_attention):
    assert ma.ref_attn.to_k.in_features == model.controlnet.skip_channels[k]
  assert sorted(k for _, _, k in model.slots) == list(range(6))


def test_untrained_cassr_equals_unet_plus_controlnet(sd_like, rng):
  tu, tc, model = sd_like
  x, t, ctx, lr_up, ref = _inputs(rng)
  with torch.no_grad():
    tx, tt, tctx = torch.tensor(nhwc_to_nchw(x)), torch.tensor(np.asarray(t)), torch.tensor(np.asarray(ctx))
    down, mid = tc(tx, tt, tctx, torch.tensor(nhwc_to_nchw(lr_up)), return_dict=False)
    expected = tu(tx, tt, tctx, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid).sample.numpy()
  ours = jit_call(model, x, t, ctx, lr_up, ref)
  assert relative_max_error(nhwc_to_nchw(ours), expected) <= 1e-4
  # The reference image matters once the attention output projections are non-zero.
  trained = nnx.clone(model)
  for ma in trained.multi_attention:
    for attn in (ma.ref_attn, ma.lr_attn):
      kernel = attn.to_out[0].kernel
      kernel.set_value(jnp.full(kernel.get_value().shape, 0.5, kernel.get_value().dtype))
  a = jit_call(trained, x, t, ctx, lr_up, ref)
  b = jit_call(trained, x, t, ctx, lr_up, 1.0 - ref)
  assert relative_max_error(a, b) > 1e-3
  assert relative_max_error(a, ours) > 1e-3


def test_every_trainable_leaf_gets_gradient_and_frozen_stays(rng):
  unet = UNet2DConditionModel(UNetConfig.from_diffusers(TINY_UNET), attention="xla", rngs=nnx.Rngs(2))
  model = cassr_from_pretrained(unet, attention="xla")
  frozen_before = jax.tree.map(np.asarray, nnx.state(model, frozen_filter(model)))
  trainable = trainable_filter(model)
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=trainable)
  x, t, ctx, lr_up, ref = _inputs(rng)
  target = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return jnp.mean((m(x, t, ctx, lr_up, ref) - target) ** 2)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model)
    optimizer.update(model, grads)
    return grads

  seen = None
  for _ in range(2):
    grads = step(model, optimizer)
    nonzero = jax.tree.map(lambda g: bool(np.any(np.asarray(g) != 0)), grads)  # numpy: no compile per shape
    seen = nonzero if seen is None else jax.tree.map(lambda a, b: a or b, seen, nonzero)
  flat = nnx.to_flat_state(seen)
  missing = [".".join(map(str, p)) for p, v in flat if not v.get_value()]
  assert len(flat) > 0 and not missing, f"no gradient within two steps: {missing}"
  frozen_after = jax.tree.map(np.asarray, nnx.state(model, frozen_filter(model)))
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
    assert np.array_equal(a, b)
  paths = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, trainable))}
  assert paths == {"controlnet", "multi_attention"}


@pytest.mark.parametrize("switches", [dict(multiple_attention=False), dict(residual_add=False),
                                      dict(reference_source="lr")])
def test_ablation_switches(switches, rng):
  config = CasSRConfig.from_unet(UNetConfig.from_diffusers(TINY_UNET), **switches)
  model = CasSRUNet(config, attention="xla", rngs=nnx.Rngs(3))
  x, t, ctx, lr_up, ref = _inputs(rng, batch=1)
  out = jit_call(model, x, t, ctx, lr_up, None if switches.get("reference_source") == "lr" else ref)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  if not config.multiple_attention:
    assert model.multi_attention is None
  if not config.residual_add:
    unused = model.unused_controlnet_parts()
    assert "controlnet_down_blocks" in unused and "down_blocks.1" in unused
    trainable = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(model)))}
    assert not any(k.startswith("controlnet.controlnet_down_blocks") for k in trainable)


def test_config_validation():
  unet = UNetConfig.from_diffusers(TINY_UNET)
  with pytest.raises(ValueError, match="both off"):
    CasSRConfig.from_unet(unet, multiple_attention=False, residual_add=False)
  with pytest.raises(ValueError, match="reference_source"):
    CasSRConfig.from_unet(unet, reference_source="sr")
  with pytest.raises(ValueError, match="down path must match"):
    CasSRConfig(unet=unet, controlnet=ControlNetConfig.from_unet(dataclasses.replace(unet, layers_per_block=2)))


def test_bf16_compute_close_to_fp32(rng):
  unet = UNetConfig.from_diffusers(TINY_UNET)
  config = CasSRConfig.from_unet(unet)
  fp32 = CasSRUNet(config, attention="xla", rngs=nnx.Rngs(4))
  for ma in fp32.multi_attention:  # make the new attention contribute
    for attn in (ma.ref_attn, ma.lr_attn):
      k = attn.to_out[0].kernel
      k.set_value(jnp.full(k.get_value().shape, 0.02, jnp.float32))
  bf16 = eval_shape(lambda: CasSRUNet(config, policy=Policy(jnp.float32, jnp.bfloat16), attention="xla",
                                          rngs=nnx.Rngs(4)))
  nnx.update(bf16, nnx.state(fp32, nnx.Param))
  args = _inputs(rng)
  a = jit_call(fp32, *args)
  b = jit_call(bf16, *args)
  assert b.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(b.astype(jnp.float32))))
  assert relative_max_error(b.astype(jnp.float32), a) <= 2e-2


def test_cassr_checkpoint_round_trip(tmp_path):
  config = CasSRConfig.from_unet(UNetConfig.from_diffusers(TINY_UNET), conditioning_scale=0.5)
  model = CasSRUNet(config, rngs=nnx.Rngs(5))
  checkpoint.save_model(str(tmp_path / "cassr"), model, "cassr_unet", config)
  back = checkpoint.load_model(str(tmp_path / "cassr"))
  assert back.config == config
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
    assert np.array_equal(np.asarray(a), np.asarray(b))
