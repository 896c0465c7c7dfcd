"""AutoencoderKL: parity with diffusers (random weights, small configs), posterior, latents scaling,
checkpoint names, config validation, dtype policy, registry round trip."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

from cassr_jax.convert.keys import load_vae_state_dict
from cassr_jax import checkpoint
from cassr_jax.convert.state_dict import CheckpointError
from cassr_jax.convert.strict import export_torch_state
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import vae
from cassr_jax.nn.layers import Policy
from conftest import relative_max_error

# Three levels (two downsamples, so the asymmetric pad runs twice), a width change in the shortcut convs.
SMALL = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, latent_channels=4)
# The optional parts switched off: no mid attention, no quant convs; two layers per block.
BARE = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=8, latent_channels=3,
            mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)


def _torch_vae(kwargs, seed=0):
  """A diffusers VAE with every weight perturbed (GroupNorm scales and biases included)."""
  torch.manual_seed(seed)
  model = TorchVAE(**kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _numpy_state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _abstract(config, **kwargs):
  # Shapes only: eager random init compiles one kernel per parameter shape, which is slow on CPU.
  return eval_shape(lambda: vae.AutoencoderKL(config, rngs=nnx.Rngs(0), **kwargs))


def _ours(torch_model, **kwargs):
  model = _abstract(vae.VAEConfig.from_diffusers(dict(torch_model.config)), **kwargs)
  load_vae_state_dict(model, _numpy_state(torch_model))
  return model


def _random(config, seed=0, **kwargs):
  """Our model with numpy-random weights (norm scales around 1)."""
  model = _abstract(config, **kwargs)
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    value = rng.normal(0.0, 0.2, var.shape) + (1.0 if path[-1] == "scale" else 0.0)
    var.set_value(jnp.asarray(value, var.dtype))
  nnx.update(model, state)
  return model


TINY = vae.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)


def _nhwc(a):
  return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
  return np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def small_torch():
  return _torch_vae(SMALL)


@pytest.fixture(scope="module")
def small_ours(small_torch):
  return _ours(small_torch, attention="xla")


def _torch_reference(model, images, latents):
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(images)).latent_dist
    decoded = model.decode(torch.from_numpy(latents)).sample
  return posterior.mean.numpy(), posterior.logvar.numpy(), decoded.numpy()


@nnx.jit
def _run(model, images, latents):
  """Everything the parity tests compare, in one compiled call (eager dispatch compiles op by op)."""
  posterior = model.encode(images)
  return posterior.mean, posterior.logvar, model.decode(latents)


def _assert_parity(torch_model, ours, images, latents, tolerance=1e-4):
  reference = _torch_reference(torch_model, images, latents)
  outputs = _run(ours, jnp.asarray(_nhwc(images)), jnp.asarray(_nhwc(latents)))
  errors = [relative_max_error(_nchw(got), want) for got, want in zip(outputs, reference)]
  assert max(errors) <= tolerance, errors
  return outputs


def test_parity_encode_decode(small_torch, rng):
  ours = _ours(small_torch, attention="xla")
  # Non-square so a height/width mix-up cannot pass.
  images = rng.uniform(-1, 1, (2, 3, 32, 24)).astype(np.float32)
  latents = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
  mean, _, decoded = _assert_parity(small_torch, ours, images, latents)
  assert mean.shape == (2, 8, 6, 4) and decoded.shape == (2, 24, 20, 3)


def test_parity_decode_blockwise_attention(small_torch, rng):
  """The mid-block attention through the blockwise (online-softmax) code path."""
  ours = _ours(small_torch, attention="blockwise")
  latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    reference = small_torch.decode(torch.from_numpy(latents)).sample.numpy()
  decoded = nnx.jit(lambda m, z: m.decode(z))(ours, jnp.asarray(_nhwc(latents)))
  assert relative_max_error(_nchw(decoded), reference) <= 1e-4


def test_parity_without_optional_parts(rng):
  torch_model = _torch_vae(BARE, seed=1)
  ours = _ours(torch_model)
  assert ours.quant_conv is None and ours.post_quant_conv is None and ours.encoder.mid_block.attentions is None
  images = rng.uniform(-1, 1, (1, 3, 16, 12)).astype(np.float32)
  latents = rng.standard_normal((1, 3, 8, 6)).astype(np.float32)
  _assert_parity(torch_model, ours, images, latents)


def test_posterior_sample_mode_and_clipping():
  moments = jnp.concatenate([jnp.full((1, 2, 2, 4), 0.5), jnp.full((1, 2, 2, 4), -1.0)], axis=-1)
  moments = moments.at[0, 0, 0, 4].set(100.0).at[0, 0, 1, 4].set(-100.0)
  post = vae.DiagonalGaussian.from_moments(moments)
  assert float(post.logvar.max()) == vae.LOGVAR_MAX and float(post.logvar.min()) == vae.LOGVAR_MIN
  np.testing.assert_array_equal(post.mode(), post.mean)
  key = jax.random.key(3)
  noise = jax.random.normal(key, post.mean.shape)
  np.testing.assert_allclose(post.sample(key), post.mean + jnp.exp(0.5 * post.logvar) * noise, rtol=1e-6)
  assert not np.allclose(post.sample(key), post.sample(jax.random.key(4)))
  np.testing.assert_array_equal(post.sample(key), post.sample(key))


def test_scaled_latents(rng):
  tiny = _random(TINY)
  images = jnp.asarray(rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32))
  z = jnp.asarray(rng.standard_normal((1, 4, 4, 4)).astype(np.float32))

  @nnx.jit
  def run(m, x, z, key):
    return (m.encode(x).mean, m.encode_latents(x), m.encode_latents(x, key), m.decode(z),
            m.decode_latents(z * 0.18215), m(x))

  mean, scaled, sampled, decoded, decoded_scaled, recon = run(tiny, images, z, jax.random.key(0))
  # The forward pass is decode(mode(encode(x))), diffusers' forward with sample_posterior=False.
  np.testing.assert_allclose(recon, run(tiny, images, mean, jax.random.key(0))[3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(scaled, mean * 0.18215, rtol=1e-5, atol=1e-6)
  assert not np.allclose(sampled, scaled)
  np.testing.assert_allclose(decoded_scaled, decoded, rtol=1e-4, atol=1e-5)
  shifted = _abstract(vae.VAEConfig(block_out_channels=(8,), norm_num_groups=4, scaling_factor=2.0,
                                    shift_factor=0.5))
  np.testing.assert_allclose(shifted.scale_latents(z), (z - 0.5) * 2.0)
  np.testing.assert_allclose(shifted.unscale_latents(shifted.scale_latents(z)), z, rtol=1e-6, atol=1e-6)


def test_old_attention_names_and_conv_weights(small_torch, small_ours):
  """Pre-0.14 diffusers names (query/key/value/proj_attn) with 1x1-conv weights load to the same model."""
  old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for key, value in _numpy_state(small_torch).items():
    m = re.match(r"(.*mid_block\.attentions\.0\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
    if m:
      key = f"{m[1]}{old_names[m[2]]}.{m[3]}"
      value = value[:, :, None, None] if m[3] == "weight" else value
    state[key] = value
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in state
  model = _abstract(small_ours.config)
  load_vae_state_dict(model, state)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(small_ours, nnx.Param))):
    np.testing.assert_array_equal(a, b)


def test_bad_checkpoint_names_every_problem(small_torch, small_ours):
  state = _numpy_state(small_torch)
  del state["decoder.conv_out.bias"]
  state["encoder.extra.weight"] = np.zeros(3, np.float32)
  state["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(CheckpointError) as info:
    load_vae_state_dict(_abstract(small_ours.config), state, source="bad.safetensors")
  message = str(info.value)
  for fragment in ("bad.safetensors", "decoder.conv_out.bias", "encoder.extra.weight", "quant_conv.weight"):
    assert fragment in message


def test_config_from_diffusers():
  sd15 = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
          "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
          "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
  assert vae.VAEConfig.from_diffusers(sd15) == vae.VAEConfig.sd15()
  assert vae.VAEConfig.sd15().downscale == 8
  bad_cases = {
      "act_fn='gelu'": {"act_fn": "gelu"},
      "AttnDownEncoderBlock2D": {"down_block_types": ["AttnDownEncoderBlock2D"] + ["DownEncoderBlock2D"] * 3},
      "latents_mean": {"latents_mean": [0.0] * 4},
      "'spatial_norm'": {"spatial_norm": True},
      "3 down": {"down_block_types": ["DownEncoderBlock2D"] * 3},
  }
  for fragment, change in bad_cases.items():
    with pytest.raises(ValueError, match=re.escape(fragment)):
      vae.VAEConfig.from_diffusers({**sd15, **change})
  with pytest.raises(ValueError, match="norm_num_groups"):
    vae.VAEConfig(block_out_channels=(24,), norm_num_groups=32)


def test_input_shape_errors(small_ours):
  with pytest.raises(ValueError, match="3 channels"):
    small_ours.encode(jnp.zeros((1, 16, 16, 4)))
  with pytest.raises(ValueError, match="multiples of 4"):
    small_ours.encode(jnp.zeros((1, 18, 16, 3)))
  with pytest.raises(ValueError, match="4 channels"):
    small_ours.decode(jnp.zeros((1, 4, 4, 3)))


def test_dtype_policies(rng):
  reference_model = _random(TINY, seed=2)
  weights = export_torch_state(reference_model)
  latents = jnp.asarray(rng.standard_normal((1, 4, 4, 4)).astype(np.float32))
  forward = nnx.jit(lambda m, z: m.decode(z))
  reference = np.asarray(forward(reference_model, latents))
  for policy in (Policy(jnp.float32, jnp.bfloat16), Policy(jnp.bfloat16, jnp.bfloat16)):
    model = _abstract(TINY, policy=policy)
    load_vae_state_dict(model, weights)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(policy.param_dtype)}
    out = forward(model, latents)
    assert out.dtype == jnp.bfloat16
    assert relative_max_error(out, reference) < 5e-2


def test_registry_round_trip_and_logical_axes(tmp_path, rng):
  """Built with no mesh, parameters carry logical axis names; save_model/load_model reproduce the outputs."""
  model = _random(TINY, seed=3)
  kernel = model.encoder.mid_block.attentions[0].to_q.kernel
  assert kernel.get_metadata()["out_sharding"] == ("embed_in", "embed_out")
  assert model.encoder.conv_in.kernel.get_metadata()["out_sharding"] == (None, None, "embed_in", "embed_out")
  checkpoint.save_model(str(tmp_path / "vae"), model, "vae", model.config)
  restored = checkpoint.load_model(str(tmp_path / "vae"))
  assert isinstance(restored, vae.AutoencoderKL) and restored.config == model.config
  z = jnp.asarray(rng.standard_normal((1, 4, 4, 4)).astype(np.float32))
  decode = nnx.jit(lambda m, z: m.decode(z))
  np.testing.assert_array_equal(decode(restored, z), decode(model, z))
