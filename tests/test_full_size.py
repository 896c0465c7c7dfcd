"""Parity at full SD-1.5 size with random weights: the U-Net on a 64x64 latent (a 512x512 image), batch 1,
77 text tokens. Tolerance: 1e-3 of the output's max magnitude (fp32).

Run: python -m pytest -m slow tests/test_full_size.py -s
(prints the measured error and times; 7.1 GiB peak RSS measured: the torch model and ours, 3.4 GB each, overlap
only while the weights are copied.)

The VAE and CLIP full-size checks (tests/test_full_size_vae_clip.py) follow the same pattern, and may use
the helpers here: a random diffusers/transformers model with perturbed norms, the torch reference computed
first, our model built abstractly (nnx.eval_shape: no random init of hundreds of millions of parameters)
and filled strictly from the state dict, the torch model freed before our forward, the error printed.
"""
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cassr_jax.convert.strict import load_torch_state
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models.unet import UNet2DConditionModel, UNetConfig
from conftest import relative_max_error

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.slow

TOLERANCE = 1e-3
LATENT = 64  # 512x512 image
SD15_UNET_PARAMS = 859_520_964


def perturb_norms(model, seed: int, scale: float = 0.1) -> None:
  """Random GroupNorm/LayerNorm scales and biases, so a wrong mapping of them cannot pass."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        module.weight.add_(scale * torch.randn(module.weight.shape, generator=gen))
        module.bias.add_(scale * torch.randn(module.bias.shape, generator=gen))


def abstract_load(build, torch_model, *, source: str):
  """Our model from `build()` (traced abstractly: no parameter init) with `torch_model`'s weights, strictly."""
  model = eval_shape(build)
  load_torch_state(model, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, source=source)
  return model


def timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


def compiled_forward(model, *args):
  """jit over nnx.split/merge (parameters are arguments, not constants); returns (fn, state, compile seconds)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
  compiled, seconds = timed(lambda: fn.lower(state, *args).compile())
  return compiled, state, seconds


def sd15_torch_unet(seed: int = 0):
  """diffusers' default UNet2DConditionModel is SD-1.5's shape except the text width (1280 -> 768)."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(cross_attention_dim=768, sample_size=LATENT).eval()
  perturb_norms(model, seed + 1)
  return model


def test_full_size_sd15_unet():
  torch_model = sd15_torch_unet()
  assert sum(p.numel() for p in torch_model.parameters()) == SD15_UNET_PARAMS
  config = UNetConfig.from_diffusers(dict(torch_model.config))
  assert config == UNetConfig.sd15()
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
  context = rng.standard_normal((1, 77, 768)).astype(np.float32)
  timesteps = np.array([500], np.int64)
  with torch.no_grad():
    ref, torch_s = timed(lambda: torch_model(torch.from_numpy(sample), torch.from_numpy(timesteps),
                                             torch.from_numpy(context)).sample.numpy())
  ours = abstract_load(lambda: UNet2DConditionModel(config, attention="auto", rngs=nnx.Rngs(0)), torch_model,
                       source="diffusers SD-1.5 unet")
  del torch_model
  gc.collect()
  args = (jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), jnp.asarray(context))
  forward, state, compile_s = compiled_forward(ours, *args)
  del ours
  out, jax_s = timed(lambda: np.asarray(forward(state, *args)))
  err = relative_max_error(out.transpose(0, 3, 1, 2), ref)
  print(f"\nSD-1.5 U-Net {LATENT}x{LATENT} latent, fp32, attention auto ({jax.default_backend()}): "
        f"rel err {err:.2e} (max |ref| {np.abs(ref).max():.3f}); torch {torch_s:.1f}s, "
        f"jax compile {compile_s:.1f}s + run {jax_s:.1f}s")
  assert out.shape == (1, LATENT, LATENT, 4)
  assert err <= TOLERANCE
