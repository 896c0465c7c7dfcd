"""Stage-1 ControlNet model: parity with diffusers' U-Net + ControlNet, training split, config, save/load."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cassr_fixtures import TINY_UNET, nchw_to_nhwc, nhwc_to_nchw, random_torch_pair, state_dict_numpy
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import config_from_dict
from cassr_jax.models import frozen_filter, trainable_filter
from cassr_jax import checkpoint
from cassr_jax.convert.strict import load_torch_state
from cassr_jax.models.controlnet import ControlNetConfig, ControlNetModel
from cassr_jax.models.controlnet_sr import (ControlNetSR, ControlNetSRConfig, controlnet_sr_from_pretrained)
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from conftest import jit_call, relative_max_error


@pytest.fixture(scope="module")
def converted():
  """diffusers U-Net + ControlNet with random weights (zero convs included) and ours holding the same."""
  tu, tc = random_torch_pair(TINY_UNET, seed=2)
  unet = eval_shape(lambda: UNet2DConditionModel(
      UNetConfig.from_diffusers(dict(tu.config)), attention="xla", rngs=nnx.Rngs(0)))
  controlnet = eval_shape(lambda: ControlNetModel(
      ControlNetConfig.from_diffusers(dict(tc.config)), attention="xla", rngs=nnx.Rngs(0)))
  load_torch_state(unet, state_dict_numpy(tu), source="unet")
  load_torch_state(controlnet, state_dict_numpy(tc), source="controlnet")
  model = controlnet_sr_from_pretrained(unet, controlnet, conditioning_scale=0.7, attention="xla")
  return tu, tc, model


def _inputs(rng, batch=2, latent=8):
  x = rng.standard_normal((batch, 4, latent, latent)).astype(np.float32)
  t = np.array([11, 500][:batch])
  ctx = rng.standard_normal((batch, 5, 24)).astype(np.float32)
  lr_up = rng.random((batch, 3, 8 * latent, 8 * latent)).astype(np.float32)
  return x, t, ctx, lr_up


def test_matches_diffusers_unet_plus_controlnet(converted, rng):
  tu, tc, model = converted
  assert model.unet is not None and model.config.conditioning_scale == 0.7
  x, t, ctx, lr_up = _inputs(rng)
  with torch.no_grad():
    tx, tt, tctx = torch.tensor(x), torch.tensor(t), torch.tensor(ctx)
    down, mid = tc(tx, tt, tctx, torch.tensor(lr_up), conditioning_scale=0.7, return_dict=False)
    expected = tu(tx, tt, tctx, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid).sample.numpy()
    plain = tu(tx, tt, tctx).sample.numpy()
  ours = jit_call(model, *[jnp.asarray(a) for a in (nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(lr_up))])
  err = relative_max_error(nhwc_to_nchw(ours), expected)
  print(f"ControlNetSR vs diffusers: relative max error {err:.2e}")
  assert err <= 1e-4, err
  assert relative_max_error(expected, plain) > 1e-2  # the ControlNet (and so the LR image) matters


def test_training_split_and_bad_input(converted, rng):
  _, _, model = converted
  trainable = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(model)))}
  frozen = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, frozen_filter(model)))}
  assert trainable == {"controlnet"} and frozen == {"unet"}
  n_params = len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert n_params == (len(nnx.to_flat_state(nnx.state(model, trainable_filter(model))))
                      + len(nnx.to_flat_state(nnx.state(model, frozen_filter(model)))))
  x, t, ctx, lr_up = (jnp.asarray(a) for a in _inputs(rng, batch=1))
  with pytest.raises(ValueError, match=r"lr_up of shape \(1, 64, 64, 3\)"):
    model(jnp.asarray(nchw_to_nhwc(x)), t, ctx, jnp.asarray(nchw_to_nhwc(lr_up))[:, :32])


def test_config_and_save_load(converted, tmp_path):
  _, _, model = converted
  config = model.config
  assert config_from_dict(ControlNetSRConfig, dataclasses.asdict(config)) == config
  with pytest.raises(ValueError, match="unknown config keys"):
    config_from_dict(ControlNetSRConfig, {**dataclasses.asdict(config), "scale": 1})
  with pytest.raises(ValueError, match="down path must match"):
    ControlNetSRConfig(unet=config.unet, controlnet=dataclasses.replace(config.controlnet, layers_per_block=2))
  with pytest.raises(ValueError, match="ControlNet's config differs"):
    other = dataclasses.replace(config, controlnet=dataclasses.replace(config.controlnet, conditioning_channels=4))
    ControlNetSR(other, unet=model.unet, controlnet=model.controlnet, rngs=nnx.Rngs(0))
  checkpoint.save_model(str(tmp_path / "cn_sr"), model, "controlnet_sr", config)
  back = checkpoint.load_model(str(tmp_path / "cn_sr"))
  assert isinstance(back, ControlNetSR) and back.config == config
  a, b = jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))
  assert len(a) == len(b) and all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))
