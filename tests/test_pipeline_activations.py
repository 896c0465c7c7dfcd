"""SCEdit and ControlNet stage-1 activations (tiny random models): shape, determinism, registry."""
import numpy as np
import pytest
from flax import nnx

from cassr_jax.activation import build_activation
from cassr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from cassr_jax.models.controlnet_sr import ControlNetSR, ControlNetSRConfig
from cassr_jax.models.scedit import SCEditConfig, SCEditUNet
from cassr_jax.models.vae import AutoencoderKL
from cassr_jax.text import load_tokenizer
from test_pipeline import TINY_CONTROLNET, TINY_UNET, TINY_VAE, random_model, write_tiny_tokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  tok_dir = str(tmp_path_factory.mktemp("tok"))
  vocab = write_tiny_tokenizer(tok_dir)
  vae = random_model(lambda: AutoencoderKL(TINY_VAE, attention="xla", rngs=nnx.Rngs(0)), 1)
  text_config = CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2)
  text = random_model(lambda: CLIPTextModel(text_config, attention="xla", rngs=nnx.Rngs(0)), 2)
  return dict(vae=vae, text_encoder=text, tokenizer=load_tokenizer(tok_dir))


def _model(name):
  if name == "scedit":
    config = SCEditConfig(unet=TINY_UNET, hint_out_channels=16)
    return random_model(lambda: SCEditUNet(config, attention="xla", rngs=nnx.Rngs(0)), 3)
  config = ControlNetSRConfig(unet=TINY_UNET, controlnet=TINY_CONTROLNET)
  return random_model(lambda: ControlNetSR(config, attention="xla", rngs=nnx.Rngs(0)), 4)


@pytest.mark.slow  # two more sampling loops to compile (tiny SD stand-ins)
@pytest.mark.parametrize("name", ["scedit", "controlnet"])
def test_diffusion_activation_shape_and_determinism(name, parts, rng):
  act = build_activation(name, model=_model(name), scale=2, steps=2, guidance_scale=2.0, seed=5, **parts)
  assert act.name == name and act.scale == 2 and not act.jittable
  lr = rng.random((2, 9, 7, 3)).astype(np.float32)
  ref = np.asarray(act(lr))
  assert ref.shape == (2, 18, 14, 3) and 0.0 <= ref.min() and ref.max() <= 1.0
  np.testing.assert_array_equal(np.asarray(act(lr)), ref)  # same seed, same output
  assert np.abs(ref[0] - ref[1]).max() > 1e-3  # per-image noise and inputs differ
  fn, state = act.pure()
  np.testing.assert_array_equal(np.asarray(fn(state, lr)), ref)
