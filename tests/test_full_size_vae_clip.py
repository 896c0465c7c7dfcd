"""Parity at full SD-1.5 size with random weights: VAE encode of a 512x512 image, VAE decode of a 64x64 latent,
CLIP ViT-L/14 text encoder on 77 tokens. Tolerance: 1e-3 of the output's max magnitude (fp32).

Run: python -m pytest -m slow tests/test_full_size_vae_clip.py -s
(each test prints its measured error and times; several GiB of RAM for the VAE at 512x512).
"""
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cassr_jax.convert.keys import load_clip_state_dict, load_vae_state_dict
from cassr_jax.jax_compat import eval_shape
from cassr_jax.models import clip_text, vae
from conftest import relative_max_error

pytestmark = pytest.mark.slow

TOLERANCE = 1e-3
IMAGE = 512


def _perturb_norms(model, seed):
  """Random GroupNorm/LayerNorm scales and biases, so a wrong mapping of them cannot pass."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
        module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))


@pytest.fixture(scope="module")
def sd15_vae():
  from diffusers import AutoencoderKL as TorchVAE  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = TorchVAE(
      block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
      norm_num_groups=32, sample_size=512).eval()
  _perturb_norms(model, 1)
  config = vae.VAEConfig.from_diffusers(dict(model.config))
  assert config == vae.VAEConfig.sd15()
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, config, state


def _ours_vae(config, state):
  model = eval_shape(lambda: vae.AutoencoderKL(config, attention="auto", rngs=nnx.Rngs(0)))
  load_vae_state_dict(model, state)
  return model


def _timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


def test_full_size_vae_encode(sd15_vae):
  torch_model, config, state = sd15_vae
  image = np.random.default_rng(0).uniform(-1, 1, (1, 3, IMAGE, IMAGE)).astype(np.float32)
  with torch.no_grad():
    posterior, torch_s = _timed(lambda x: torch_model.encode(x).latent_dist, torch.from_numpy(image))
  mean, logvar = posterior.mean.numpy(), posterior.logvar.numpy()
  del posterior
  ours = _ours_vae(config, state)
  encode = nnx.jit(lambda m, x: (lambda p: (p.mean, p.logvar))(m.encode(x)))
  (got_mean, got_logvar), jax_s = _timed(
      lambda x: [np.asarray(a) for a in encode(ours, x)], jnp.asarray(image.transpose(0, 2, 3, 1)))
  err_mean = relative_max_error(got_mean.transpose(0, 3, 1, 2), mean)
  err_logvar = relative_max_error(got_logvar.transpose(0, 3, 1, 2), logvar)
  print(f"\nVAE encode {IMAGE}x{IMAGE}: rel err mean {err_mean:.2e}, logvar {err_logvar:.2e}; "
        f"torch {torch_s:.1f}s, jax (compile+run) {jax_s:.1f}s")
  assert got_mean.shape == (1, IMAGE // 8, IMAGE // 8, 4)
  assert err_mean <= TOLERANCE and err_logvar <= TOLERANCE


def test_full_size_vae_decode(sd15_vae):
  torch_model, config, state = sd15_vae
  latent = np.random.default_rng(1).standard_normal((1, 4, IMAGE // 8, IMAGE // 8)).astype(np.float32)
  with torch.no_grad():
    decoded, torch_s = _timed(lambda z: torch_model.decode(z).sample.numpy(), torch.from_numpy(latent))
  ours = _ours_vae(config, state)
  decode = nnx.jit(lambda m, z: m.decode(z))
  got, jax_s = _timed(lambda z: np.asarray(decode(ours, z)), jnp.asarray(latent.transpose(0, 2, 3, 1)))
  err = relative_max_error(got.transpose(0, 3, 1, 2), decoded)
  print(f"\nVAE decode {IMAGE // 8}x{IMAGE // 8} -> {IMAGE}x{IMAGE}: rel err {err:.2e}; "
        f"torch {torch_s:.1f}s, jax (compile+run) {jax_s:.1f}s")
  assert got.shape == (1, IMAGE, IMAGE, 3)
  assert err <= TOLERANCE


def test_full_size_clip_text():
  from transformers import CLIPTextConfig as TorchConfig  # pylint: disable=import-outside-toplevel
  from transformers import CLIPTextModel as TorchModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  # openai/clip-vit-large-patch14's text tower, as shipped in SD-1.5's text_encoder/config.json.
  torch_config = TorchConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                             bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768)
  torch_model = TorchModel(torch_config).eval()
  _perturb_norms(torch_model, 2)
  config = clip_text.CLIPTextConfig.from_transformers(torch_config.to_dict())
  assert config == clip_text.CLIPTextConfig.sd15()
  ids = np.random.default_rng(2).integers(0, 49406, (2, 77))
  ids[:, 0] = 49406
  ids[0, 9:] = 49407  # SD-1.5's tokenizer pads with <|endoftext|>
  ids[1, -1] = 49407
  with torch.no_grad():
    ref, torch_s = _timed(lambda x: torch_model(x, output_hidden_states=True), torch.from_numpy(ids))
  ours = eval_shape(lambda: clip_text.CLIPTextModel(config, rngs=nnx.Rngs(0)))
  load_clip_state_dict(ours, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
  run = nnx.jit(lambda m, x: m(x, hidden_layer=-2))
  out, jax_s = _timed(lambda x: run(ours, x), jnp.asarray(ids))
  errors = {
      "last_hidden_state": relative_max_error(out.last_hidden_state, ref.last_hidden_state.numpy()),
      "pooler_output": relative_max_error(out.pooler_output, ref.pooler_output.numpy()),
      "penultimate": relative_max_error(out.hidden_state, ref.hidden_states[-2].numpy()),
  }
  print("\nCLIP ViT-L/14 text, 2x77 tokens: rel err " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        + f"; torch {torch_s:.2f}s, jax (compile+run) {jax_s:.1f}s")
  assert max(errors.values()) <= TOLERANCE
