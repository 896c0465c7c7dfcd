"""Stage-1 activation interface: registry, bicubic, RRDBNet wrapper, tiling, batch helper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from flax import nnx

from cassr_jax import activation as act_lib
from cassr_jax import tiling
from cassr_jax.activation.bicubic import BicubicActivation
from cassr_jax.activation.rrdbnet import RRDBNetActivation
from cassr_jax.image_ops import downscale_bicubic, to_uint8
from cassr_jax.models.rrdbnet import RRDBNet, RRDBNetConfig


def test_registry_by_name_and_config():
  bic = act_lib.build_activation("bicubic")
  assert isinstance(bic, act_lib.Activation) and bic.scale == 4 and bic.jittable
  assert act_lib.build_activation({"name": "bicubic", "scale": 2}).scale == 2
  assert {"bicubic", "rrdbnet", "scedit", "controlnet"} <= set(act_lib.available_activations())
  with pytest.raises(ValueError, match=r"unknown activation 'nope'.*bicubic"):
    act_lib.build_activation("nope")
  with pytest.raises(ValueError, match=r"unknown options \['tile'\]; accepted: \['scale'\]"):
    act_lib.build_activation("bicubic", tile=3)
  with pytest.raises(ValueError, match="needs a 'name' key"):
    act_lib.build_activation({"scale": 2})
  # A later module registers itself the same way.
  act_lib.register_activation("identity_for_test", lambda: BicubicActivation(scale=1))
  assert act_lib.build_activation("identity_for_test").scale == 1


def test_bicubic_activation_matches_torch_and_runs_in_jit(rng):
  lr = rng.random((2, 10, 12, 3)).astype(np.float32)
  act = BicubicActivation(scale=4)
  out = np.asarray(act(jnp.asarray(lr)))
  ref = F.interpolate(torch.from_numpy(lr).permute(0, 3, 1, 2), scale_factor=4, mode="bicubic",
                      align_corners=False).clamp(0, 1).permute(0, 2, 3, 1).numpy()
  assert out.shape == (2, 40, 48, 3) and out.min() >= 0.0 and out.max() <= 1.0
  assert np.max(np.abs(out - ref)) < 1e-5
  fn, state = act.pure()
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(state, lr)), out, atol=1e-6)
  with pytest.raises(ValueError, match=r"expected LR images of shape \(B, h, w, 3\)"):
    act(jnp.zeros((10, 12, 3)))
  with pytest.raises(ValueError, match="expected float images"):
    act(jnp.zeros((1, 10, 12, 3), jnp.uint8))


def test_tiling_is_exact_within_the_receptive_field(rng):
  """A function with a 4-pixel receptive field tiles exactly when the discarded margin covers it."""
  kernel = jnp.ones((3, 3, 1, 1), jnp.float32) / 9.0

  def fn(x):  # 4 chained 3x3 blurs per channel, then a nearest x2 upsample
    b, h, w, c = x.shape
    y = x.transpose(0, 3, 1, 2).reshape(b * c, h, w, 1)
    for _ in range(4):
      y = jax.lax.conv_general_dilated(y, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(b, c, h, w).transpose(0, 2, 3, 1)
    return jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)

  x = jnp.asarray(rng.random((2, 40, 53, 3)).astype(np.float32))
  full = fn(x)
  for tile_batch in (None, 2):  # 3 x 3 tiles, all at once or 2 per call (padded last call)
    tiled = jax.jit(lambda a, tb=tile_batch: tiling.tiled_apply(fn, a, tile=(24, 28), overlap=16,
                                                                 tile_batch=tb))(x)
    assert tiled.shape == full.shape
    assert float(jnp.max(jnp.abs(tiled - full))) < 1e-5
  # A margin smaller than the receptive field is no longer exact: the test above has teeth.
  assert float(jnp.max(jnp.abs(tiling.tiled_apply(fn, x, tile=24, overlap=4) - full))) > 1e-3
  assert tiling.tile_starts(100, 40, 8) == [0, 30, 60] and tiling.tile_starts(30, 40, 8) == [0]
  starts = tiling.tile_starts(104, 40, 8, align=4)
  assert all(s % 4 == 0 for s in starts) and starts[-1] == 64
  assert min(a + 40 - b for a, b in zip(starts, starts[1:])) >= 8
  with pytest.raises(ValueError, match="tile overlap"):
    tiling.tile_starts(100, 40, 40)


def test_tiling_aligns_tiles_to_the_pixel_unshuffle(rng):
  """An x2 RRDBNet folds 2x2 pixel blocks into channels: a tile starting at an odd pixel sees other blocks."""
  model = RRDBNet(RRDBNetConfig(num_feat=8, num_grow_ch=4, num_block=1, scale=2), rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.random((1, 64, 64, 3)).astype(np.float32))
  full = model(x)
  errors = {align: float(jnp.max(jnp.abs(tiling.tiled_apply(model, x, tile=36, overlap=24, align=align) - full)))
            for align in (1, 2)}
  scale = float(jnp.max(jnp.abs(full)))
  assert errors[2] < 0.01 * scale < 0.1 * scale < errors[1]


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_rrdbnet_activation_shapes_pure_and_batch_helper(rng, scale):
  config = RRDBNetConfig(num_feat=8, num_grow_ch=4, num_block=1, scale=scale)
  model = RRDBNet(config, rngs=nnx.Rngs(0))
  act = RRDBNetActivation(model=model, tile=16, tile_overlap=4, tile_batch=2, pre_pad=2)
  assert act.scale == scale and act.jittable
  lr = to_uint8(rng.random((2, 13, 19, 3))) / np.float32(255)  # odd sizes: x2/x1 pad internally; 2x2 tiles
  out = act(jnp.asarray(lr))
  assert out.shape == (2, 13 * scale, 19 * scale, 3)
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 and float(jnp.std(out)) > 1e-3
  if scale != 2:
    return
  # Inside a user's jit, with the weights passed as an argument.
  fn, state = act.pure()
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(state, lr)), np.asarray(out), atol=1e-6)
  # Host helper: batches equal shapes, takes uint8, keeps order across shape changes.
  images = [to_uint8(lr[0]), to_uint8(lr[1]), to_uint8(lr[0][:8, :12])]
  outs = list(act_lib.activate_images(act, images, batch_size=2))
  assert [o.shape for o in outs] == [(13 * scale, 19 * scale, 3)] * 2 + [(8 * scale, 12 * scale, 3)]
  np.testing.assert_allclose(np.stack(outs[:2]), np.asarray(out), atol=1e-6)


def test_rrdbnet_activation_option_errors():
  with pytest.raises(ValueError, match="tile_overlap < tile / 2"):
    RRDBNetActivation(tile=32, tile_overlap=16)  # refused before any weights are read
  with pytest.raises(ValueError, match="no such file"):
    act_lib.build_activation("rrdbnet", weights="/nonexistent/RealESRGAN_x4plus.pth")


def _psnr(a, b) -> float:
  return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


def test_real_weights_tiled_agrees_with_untiled():
  """x4plus on a 64x64 LR crop: two 56-px tiles per axis (28-px overlap) vs one pass.

  RRDBNet's receptive field (~350 LR px) is wider than any practical overlap, so tiles cannot be exact;
  measured 39.8 dB with max |diff| 40/255 for this crop (Real-ESRGAN-style hard cuts: 39.6 dB, 44/255).
  """
  hr = skimage.data.astronaut()[40:296, 180:436]
  lr = jnp.asarray(to_uint8(downscale_bicubic(hr.astype(np.float32) / 255.0, 4))[None] / 255.0, jnp.float32)
  full_act = act_lib.build_activation("rrdbnet")
  full = np.asarray(full_act(lr))[0]
  tiled = np.asarray(RRDBNetActivation(model=full_act.model, tile=56, tile_overlap=24)(lr))[0]
  psnr = _psnr(tiled, full)
  print(f"tiled vs untiled: PSNR {psnr:.2f} dB, max |diff| {np.max(np.abs(tiled - full)) * 255:.1f}/255")
  assert psnr >= 38.0
