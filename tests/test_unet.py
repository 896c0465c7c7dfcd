"""U-Net parity with diffusers' UNet2DConditionModel on small random configs, dtype policy, axis names,
and the config reader."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from cassr_jax.convert.strict import load_torch_state
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from cassr_jax.nn.layers import Policy
from conftest import relative_max_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

# SD-1.x style: 1x1-conv projections, 2 layers per block (3 skips per up level), a plain last level.
SD1 = dict(block_out_channels=(32, 64), down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP),
           layers_per_block=2, attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8)
# SD-2 style: linear projections, per-block head counts, upcast attention.
SD2 = dict(block_out_channels=(32, 64), down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP),
           layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
           cross_attention_dim=16, norm_num_groups=8)
# One level (so a cheap compile) with SD-2's options, for the reduced-precision runs.
TINY_SD2 = dict(block_out_channels=(32,), down_block_types=(CA_DOWN,), up_block_types=(CA_UP,),
                layers_per_block=1, attention_head_dim=2, use_linear_projection=True, upcast_attention=True,
                cross_attention_dim=16, norm_num_groups=8)
# A plain first level, cross-attention deeper (an up level with attention AND an upsampler); sin/cos order,
# frequency shift and norm eps differ from SD's.
DOWN_FIRST = dict(block_out_channels=(32, 64), down_block_types=(DOWN, CA_DOWN), up_block_types=(CA_UP, UP),
                  layers_per_block=1, attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8,
                  flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)


def make_torch_unet(cfg: dict, seed: int = 0):
  """A random diffusers U-Net; norm affine parameters are randomised too so their mapping is checked."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(sample_size=16, **cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  return model


def convert(torch_model, policy: Policy = Policy(), attention: str = "auto"):
  """Our model with the torch weights. Built abstractly (no random init: that costs an eager compile per
  parameter shape and dtype), then filled strictly from the state dict."""
  config = UNetConfig.from_diffusers(dict(torch_model.config))
  model = eval_shape(lambda: UNet2DConditionModel(config, policy=policy, attention=attention,
                                                      rngs=nnx.Rngs(0)))
  load_torch_state(model, {k: v.numpy() for k, v in torch_model.state_dict().items()}, source="diffusers unet")
  return model


def inputs(torch_model, rng, batch=2, size=16, tokens=7):
  c = torch_model.config
  sample = rng.standard_normal((batch, c.in_channels, size, size)).astype(np.float32)
  context = rng.standard_normal((batch, tokens, c.cross_attention_dim)).astype(np.float32)
  timesteps = np.array([999, 17][:batch], np.int64)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
  ours_in = (jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), jnp.asarray(context))
  return ours_in, ref.numpy().transpose(0, 2, 3, 1)


def run(model, args):
  return nnx.jit(lambda m, *a: m(*a))(model, *args)


@pytest.fixture(scope="module")
def sd1_torch():
  return make_torch_unet(SD1)


def test_parity_sd1_style(sd1_torch, rng):
  args, ref = inputs(sd1_torch, rng)
  out = run(convert(sd1_torch, attention="xla"), args)
  assert out.shape == ref.shape == (2, 16, 16, 4)
  assert relative_max_error(out, ref) < 1e-4


# Each layout once (compiles dominate the run time); the blockwise attention path is checked inside a U-Net
# on one of them (and against a float64 reference in test_attention.py).
@pytest.mark.parametrize("cfg,attention", [(SD2, "auto"), (DOWN_FIRST, "blockwise")],
                         ids=["sd2_linear_upcast", "downblock_first_blockwise"])
def test_parity_other_layouts(cfg, attention, rng):
  torch_model = make_torch_unet(cfg, seed=1)
  args, ref = inputs(torch_model, rng)
  assert relative_max_error(run(convert(torch_model, attention=attention), args), ref) < 1e-4


def test_reduced_precision_policies(rng):
  """fp32 params + bf16 compute, and bf16 params: finite, close to the fp32 reference, in bf16."""
  torch_model = make_torch_unet(TINY_SD2, seed=2)  # SD-2 options: exercises upcast attention under bf16
  args, ref = inputs(torch_model, rng)
  errors = {}
  for name, policy in {"fp32 params, bf16 compute": Policy(jnp.float32, jnp.bfloat16),
                       "bf16 params": Policy(jnp.bfloat16, jnp.bfloat16)}.items():
    model = convert(torch_model, policy)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == policy.param_dtype for p in params), name
    out = run(model, args)
    assert out.dtype == jnp.bfloat16, name
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), name
    errors[name] = relative_max_error(out.astype(jnp.float32), ref)
  assert errors["fp32 params, bf16 compute"] < 3e-2, errors
  assert errors["bf16 params"] < 5e-2, errors


def test_every_parameter_has_logical_axis_names():
  model = eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_diffusers(SD2), rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
  values = dict(nnx.to_flat_state(params))
  assert len(values) > 100 and specs.keys() == values.keys()
  for path, var in values.items():
    spec = specs[path].get_value()
    assert isinstance(spec, PartitionSpec) and len(spec) == len(var.shape), (path, spec)
    assert any(name is not None for name in spec), (path, spec)
    assert "embed_out" in spec, (path, spec)  # every layer's output axis is named


def diffusers_default_config() -> dict:
  signature = inspect.signature(diffusers.UNet2DConditionModel.__init__)
  return {n: p.default for n, p in signature.parameters.items() if n != "self"}


def test_from_diffusers_reads_sd_configs(sd1_torch):
  # diffusers' defaults are SD-1.5's shape except the text width (1280 there, 768 in SD-1.5).
  assert UNetConfig.from_diffusers({**diffusers_default_config(), "cross_attention_dim": 768}) == UNetConfig.sd15()
  assert UNetConfig.from_diffusers(diffusers_default_config()).cross_attention_dim == 1280
  # A real config dict (with _class_name etc.) of the tiny SD-1 model.
  cfg = UNetConfig.from_diffusers(dict(sd1_torch.config))
  assert cfg.heads == (2, 2) and cfg.block_out_channels == (32, 64) and cfg.layers_per_block == 2
  assert cfg.cross_attention_dim == 24 and cfg.up_block_types == (UP, CA_UP)
  # SD-2.1's layout: per-block head counts (named attention_head_dim in diffusers' configs).
  sd21 = {**diffusers_default_config(), "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
          "use_linear_projection": True, "upcast_attention": True, "only_cross_attention": [False] * 4,
          "transformer_layers_per_block": [1, 1, 1, 1]}
  cfg = UNetConfig.from_diffusers(sd21)
  assert cfg.heads == (5, 10, 20, 20) and cfg.use_linear_projection and cfg.upcast_attention


@pytest.mark.parametrize("change,message", [
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),  # SDXL
    ({"transformer_layers_per_block": [1, 2]}, "transformer_layers_per_block"),
    ({"down_block_types": ["AttnDownBlock2D", DOWN]}, "down block 'AttnDownBlock2D'"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"cross_attention_dim": [24, 32]}, "per-block cross_attention_dim"),
    ({"up_block_types": [UP, CA_UP, CA_UP]}, "2 block_out_channels but 2 down blocks, 3 up blocks"),
    ({"some_future_option": 3}, "unknown option some_future_option=3"),
])
def test_from_diffusers_rejects_unsupported_options(sd1_torch, change, message):
  with pytest.raises(ValueError, match="unsupported UNet2DConditionModel config: .*" + message.replace("[", r"\[")):
    UNetConfig.from_diffusers({**dict(sd1_torch.config), **change})


@pytest.mark.parametrize("shape,kernel,stride,padding,path", [
    ((1, 8, 8, 16), 3, 1, 1, "dot_general"),      # SD's 8x8 level: a matmul on CPU
    ((2, 9, 7, 8), 3, 2, 1, "dot_general"),       # stride 2, odd sizes
    ((1, 7, 7, 8), 3, 2, 0, "dot_general"),       # the VAE's unpadded downsampler
    ((1, 40, 40, 8), 1, 1, 0, "dot_general"),     # 1x1 kernels always
    ((1, 40, 40, 8), 3, 1, 1, "conv_general_dilated"),  # large outputs keep XLA's convolution
])
def test_cpu_convolution_paths_match_xla(rng, shape, kernel, stride, padding, path):
  """layers.conv_general_dilated (the U-Net's convs) equals lax's; on CPU small outputs run as one matmul."""
  from cassr_jax.nn import layers  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 12)), jnp.float32)
  args = (x, w, (stride, stride), ((padding, padding), (padding, padding)))
  ours = layers.conv_general_dilated(*args, dimension_numbers=layers._NHWC)
  ref = jax.lax.conv_general_dilated(*args, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert ours.shape == ref.shape and relative_max_error(ours, ref) < 1e-6
  if jax.default_backend() == "cpu":
    jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv_general_dilated(
        x, w, *args[2:], dimension_numbers=layers._NHWC))(x, w))
    assert path in jaxpr and ({"dot_general", "conv_general_dilated"} - {path}).pop() not in jaxpr
