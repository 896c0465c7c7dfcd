"""fit_autoencoder (cassr_jax.train.autoencoder) and a run's frozen VAE from config.init.vae."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from cassr_jax.config import ConfigError, tiny_config, validate_config
from cassr_jax.models.vae import AutoencoderKL, VAEConfig
from cassr_jax.train import autoencoder
from cassr_jax.train.components import build_components

# Two levels (x2): the fit compiles in seconds; the loss is the same code at any depth.
SMALL_VAE = VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)


def _images(n=4, size=16, seed=0):
  """Smooth random colour images (a bilinear blow-up of 4x4 noise): learnable in a few steps."""
  coarse = np.random.default_rng(seed).random((n, 4, 4, 3)).astype(np.float32)
  return np.asarray(jax.image.resize(coarse, (n, size, size, 3), "linear"))


def test_fit_autoencoder_reduces_the_reconstruction_error_and_sets_the_latent_scale():
  images = _images()
  vae = AutoencoderKL(SMALL_VAE, attention="xla", rngs=nnx.Rngs(0))
  before = np.mean(np.abs(autoencoder.reconstruct(vae, images) - images))
  logged = []
  losses = autoencoder.fit_autoencoder(vae, list(images), autoencoder.FitSettings(steps=40, batch_size=4, crop=16,
                                                                                  learning_rate=5e-3),
                                       log=lambda step, loss: logged.append(step), log_every=20)
  assert len(losses) == 40 and logged == [20, 40] and all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
  after = np.mean(np.abs(autoencoder.reconstruct(vae, images) - images))
  assert after < 0.75 * before, (before, after)
  # The scaling factor makes the posterior means of these images unit-variance.
  means = np.asarray(autoencoder.posterior_mean(vae, images))
  assert vae.config.scaling_factor == pytest.approx(1.0 / means.std(), rel=1e-4)
  with pytest.raises(ValueError, match="crop 15 is not a multiple"):
    autoencoder.fit_autoencoder(vae, list(images), autoencoder.FitSettings(steps=1, crop=15))


def test_init_vae_replaces_the_runs_vae(tmp_path):
  vae = AutoencoderKL(dataclasses.replace(SMALL_VAE, scaling_factor=0.5), attention="xla", rngs=nnx.Rngs(3))
  autoencoder.save_vae(str(tmp_path / "vae"), vae)
  config = tiny_config()
  config.data.sources = f"folder:{tmp_path}"
  config.init.vae = str(tmp_path / "vae")
  validate_config(config)
  parts = build_components(config)
  assert parts.vae.config == vae.config
  for a, b in zip(jax.tree.leaves(nnx.state(parts.vae, nnx.Param)), jax.tree.leaves(nnx.state(vae, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Bad values: one clear message naming the key.
  config.init.vae = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"init.vae=.*missing.*no such directory"):
    validate_config(config)
  config.init.vae = str(tmp_path)
  with pytest.raises(ConfigError, match=r"init.vae=.*not a saved model directory"):
    validate_config(config)
  other = tmp_path / "unet"
  other.mkdir()
  (other / "model.json").write_text(json.dumps({"model_type": "unet", "config": {}}))
  config.init.vae = str(other)
  with pytest.raises(ValueError, match=r"init.vae=.*'unet' model, not a VAE"):
    build_components(config)
  two = AutoencoderKL(VAEConfig(block_out_channels=(4,), layers_per_block=1, norm_num_groups=4, latent_channels=2),
                      attention="xla", rngs=nnx.Rngs(0))
  autoencoder.save_vae(str(tmp_path / "vae2"), two)
  config.init.vae = str(tmp_path / "vae2")
  with pytest.raises(ValueError, match="2 latent channels, the U-Net takes 4"):
    build_components(config)
