"""Fitting an AutoencoderKL to images, for a run's frozen VAE when no pretrained one is at hand (config.init.vae).

The tiny random model's VAE (init.random = "tiny") is random: its latents mean nothing, so a CasSR trained on
them decodes to noise. fit_autoencoder trains the VAE as an autoencoder (L1 reconstruction of a posterior
sample plus a small KL term, Adam), then sets its latent scaling factor to 1 / std of the latents, as SD's is,
so the diffusion model sees latents of unit variance. save_vae writes it where config.init.vae reads it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cassr_jax import checkpoint
from cassr_jax.image_ops import to_float01
from cassr_jax.models.vae import AutoencoderKL

VAE_MODEL_TYPE = "vae"


@dataclasses.dataclass(frozen=True)
class FitSettings:
  steps: int = 300
  batch_size: int = 8
  crop: int = 64             # random crops of this size (a multiple of the VAE's downscale)
  learning_rate: float = 2e-3
  kl_weight: float = 1e-6    # SD's VAE used 1e-6: latents stay informative, their scale bounded
  seed: int = 0


def _as_batch(images) -> np.ndarray:
  """A list / array of (H, W, 3) images of one size (uint8 or float in [0, 1]) -> float32 (N, H, W, 3)."""
  images = [to_float01(np.asarray(im)) for im in images]
  if not images:
    raise ValueError("fit_autoencoder: no images")
  shapes = {im.shape for im in images}
  if len(shapes) != 1 or len(next(iter(shapes))) != 3:
    raise ValueError(f"fit_autoencoder: expected (H, W, C) images of one size, got shapes {sorted(shapes)}")
  return np.stack(images)


def random_crops(images: np.ndarray, count: int, crop: int, rng: np.random.Generator) -> np.ndarray:
  """`count` random crop x crop windows of (N, H, W, C) images: random image, position, horizontal flip and
  order of the channels (colours the VAE never saw in a set of mostly grey images)."""
  n, h, w, _ = images.shape
  if crop > h or crop > w:
    raise ValueError(f"crop {crop} is larger than the images ({h}x{w})")
  idx = rng.integers(0, n, count)
  top, left = rng.integers(0, h - crop + 1, count), rng.integers(0, w - crop + 1, count)
  flip = rng.random(count) < 0.5
  out = np.stack([images[i, t:t + crop, l:l + crop] for i, t, l in zip(idx, top, left)])
  out[flip] = out[flip, :, ::-1]
  return np.stack([window[..., rng.permutation(window.shape[-1])] for window in out])


def fit_autoencoder(vae: AutoencoderKL, images, settings: FitSettings = FitSettings(), *,
                    log: Callable[[int, float], None] | None = None, log_every: int = 50) -> list[float]:
  """Trains `vae` in place on random crops of `images` ((H, W, 3) images of one size, uint8 or [0, 1]) and
  sets its scaling factor (latent_scaling_factor); returns the loss of every step. Deterministic per seed."""
  s = settings
  f = vae.config.downscale
  if s.crop % f:
    raise ValueError(f"crop {s.crop} is not a multiple of the VAE's downscale {f}")
  data = _as_batch(images)
  graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
  optimizer = optax.adam(s.learning_rate)
  opt_state = optimizer.init(params)

  def loss_fn(params, batch, key):
    model = nnx.merge(graphdef, params, rest)
    posterior = model.encode(batch * 2.0 - 1.0)
    recon = model.decode(posterior.sample(key)).astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(recon - (batch * 2.0 - 1.0)))
    mean, logvar = posterior.mean.astype(jnp.float32), posterior.logvar.astype(jnp.float32)
    # KL(q || N(0, 1)) summed over latent elements, averaged over the batch (as SD's VAE loss).
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar) / batch.shape[0]
    return l1 + s.kl_weight * kl

  @jax.jit
  def step(params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(s.seed)
  root = jax.random.key(s.seed)
  losses = []
  for i in range(s.steps):
    batch = jnp.asarray(random_crops(data, s.batch_size, s.crop, rng))
    params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(root, i))
    losses.append(float(loss))
    if not math.isfinite(losses[-1]):
      raise FloatingPointError(f"fit_autoencoder: loss {losses[-1]} at step {i}")
    if log is not None and (i + 1) % log_every == 0:
      log(i + 1, losses[-1])
  nnx.update(vae, params)
  vae.config = dataclasses.replace(vae.config, scaling_factor=latent_scaling_factor(vae, data))
  return losses


@nnx.jit
def posterior_mean(vae: AutoencoderKL, images):
  """(N, H, W, 3) images in [0, 1] -> the posterior means (unscaled latents), float32."""
  return vae.encode(images * 2.0 - 1.0).mean.astype(jnp.float32)


@nnx.jit
def _reconstruction(vae: AutoencoderKL, images):
  return jnp.clip((vae(images * 2.0 - 1.0).astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def latent_scaling_factor(vae: AutoencoderKL, images) -> float:
  """1 / std of the posterior means of `images` (SD-1.5's 0.18215 was found this way); one batch."""
  data = _as_batch(images)
  f = vae.config.downscale
  h, w = data.shape[1] // f * f, data.shape[2] // f * f
  return float(1.0 / max(np.asarray(posterior_mean(vae, jnp.asarray(data[:, :h, :w]))).std(), 1e-6))


def reconstruct(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
  """(N, H, W, 3) images in [0, 1] (H, W multiples of the downscale) -> decode(mean of encode), in [0, 1]."""
  return np.asarray(_reconstruction(vae, jnp.asarray(images, jnp.float32)))


def save_vae(directory: str, vae: AutoencoderKL) -> None:
  """The VAE as a model directory (checkpoint.save_model: atomic); config.init.vae / load_model read it."""
  checkpoint.save_model(directory, vae, VAE_MODEL_TYPE, vae.config)
