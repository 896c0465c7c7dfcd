"""ControlNet: parity with diffusers' ControlNetModel, construction from a U-Net, checkpoint round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cassr_fixtures import (TINY_UNET, nchw_to_nhwc, nhwc_to_nchw, random_torch_pair, state_dict_numpy)
from cassr_jax import checkpoint
from cassr_jax.convert.strict import load_torch_state
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_from_unet
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from conftest import jit_call, relative_max_error


@pytest.fixture(scope="module")
def torch_pair():
  return random_torch_pair(TINY_UNET)


def _inputs(rng, batch=2, latent=8):
  x = rng.standard_normal((batch, 4, latent, latent)).astype(np.float32)
  t = np.array([3, 700][:batch])
  ctx = rng.standard_normal((batch, 5, 24)).astype(np.float32)
  hint = rng.random((batch, 3, 8 * latent, 8 * latent)).astype(np.float32)
  return x, t, ctx, hint


def test_controlnet_parity_every_residual(torch_pair, rng):
  _, tc = torch_pair
  config = ControlNetConfig.from_diffusers(dict(tc.config))
  # Built abstractly: every parameter comes from the torch model (and random init is skipped).
  ours = eval_shape(lambda: ControlNetModel(config, attention="xla", rngs=nnx.Rngs(0)))
  load_torch_state(ours, state_dict_numpy(tc), source="controlnet")
  x, t, ctx, hint = _inputs(rng)
  with torch.no_grad():
    ref_down, ref_mid = tc(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), torch.tensor(hint),
                           return_dict=False)
  down, mid = jit_call(ours, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t), jnp.asarray(ctx),
                       jnp.asarray(nchw_to_nhwc(hint)))
  assert len(down) == len(ref_down) == len(ours.skip_channels)
  for ours_r, ref_r in zip(list(down) + [mid], list(ref_down) + [ref_mid]):
    assert relative_max_error(nhwc_to_nchw(ours_r), ref_r.numpy()) <= 1e-4


def test_from_unet_copies_encoder_and_zeroes_outputs(rng):
  unet = UNet2DConditionModel(UNetConfig.from_diffusers(TINY_UNET), rngs=nnx.Rngs(1))
  net = controlnet_from_unet(unet)
  for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
    a, b = nnx.state(getattr(unet, name), nnx.Param), nnx.state(getattr(net, name), nnx.Param)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  x, t, ctx, hint = _inputs(rng)
  args = [jnp.asarray(a) for a in (nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(hint))]
  # One compile for both: the residuals share the feature computation.
  (down, mid), (skips, _) = nnx.jit(lambda m, *a: (m(*a), m.features(*a)))(net, *args)
  assert all(np.abs(np.asarray(r)).max() == 0.0 for r in list(down) + [mid])
  # Without zero convs the features themselves carry signal (the hint encoder output is zero at init).
  assert np.abs(np.asarray(skips[-1])).max() > 0


def test_controlnet_config_rejects_unsupported():
  with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
    ControlNetConfig.from_diffusers({**TINY_UNET, "controlnet_conditioning_channel_order": "bgr"})


def test_controlnet_save_load_bit_identical(tmp_path, torch_pair):
  _, tc = torch_pair
  config = ControlNetConfig.from_diffusers(dict(tc.config))
  ours = eval_shape(lambda: ControlNetModel(config, rngs=nnx.Rngs(0)))
  load_torch_state(ours, state_dict_numpy(tc))
  checkpoint.save_model(str(tmp_path / "cn"), ours, "controlnet", config)
  back = checkpoint.load_model(str(tmp_path / "cn"))
  assert isinstance(back, ControlNetModel) and back.config == config
  for a, b in zip(jax.tree.leaves(nnx.state(ours, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_single_file_controlnet_matches_diffusers_converter(tmp_path, torch_pair, rng):
  """Our LDM key map agrees with diffusers' own LDM->diffusers ControlNet converter (so the test is not
  circular), and a ControlNet single file converts to the same outputs as the torch model."""
  from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
  from safetensors.numpy import save_file

  from cassr_jax.convert.diffusers import convert
  from cassr_jax.convert.single_file import to_ldm_state_dict

  _, tc = torch_pair
  config = dict(tc.config)
  original = state_dict_numpy(tc)
  ldm = to_ldm_state_dict({"controlnet": original}, {"controlnet": config})
  assert "input_hint_block.0.weight" in ldm and "zero_convs.0.0.weight" in ldm and "middle_block_out.0.bias" in ldm
  back = convert_controlnet_checkpoint({k: torch.tensor(v) for k, v in ldm.items()}, config)
  assert set(back) == set(original)
  assert all(np.array_equal(back[k].numpy(), original[k]) for k in original)

  path = tmp_path / "control_tiny.safetensors"
  save_file({"control_model." + k: np.ascontiguousarray(v) for k, v in ldm.items()}, str(path))
  out = convert(str(path), str(tmp_path / "out"), configs={"controlnet": config})
  ours = checkpoint.load_model(out["controlnet"], attention="xla")
  x, t, ctx, hint = _inputs(rng)
  with torch.no_grad():
    ref_down, ref_mid = tc(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), torch.tensor(hint),
                           return_dict=False)
  args = [jnp.asarray(a) for a in (nchw_to_nhwc(x), t, ctx, nchw_to_nhwc(hint))]
  down, mid = jit_call(ours, *args)
  assert relative_max_error(nhwc_to_nchw(mid), ref_mid.numpy()) <= 1e-4
  assert relative_max_error(nhwc_to_nchw(down[-1]), ref_down[-1].numpy()) <= 1e-4
