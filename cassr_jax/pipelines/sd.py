"""Plain Stable Diffusion text-to-image over converted weights: a check that a conversion works end to end.

    unet, vae, text_encoder, tokenizer, schedule = load_sd("weights/sd15")
    image = text_to_image(unet, vae, text_encoder, tokenizer, "a photo of a cat", steps=20, seed=0)[0]

The prompt and negative prompt are encoded once; the denoising loop, classifier-free guidance (one doubled
U-Net batch per step) and the VAE decode run as one compiled program.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cassr_jax import checkpoint, image_ops, sampling, text
from cassr_jax.schedulers.schedule import NoiseSchedule, ScheduleConfig, load_schedule_config, make_schedule

SD_COMPONENTS = ("unet", "vae", "text_encoder")


def load_sd(weights_dir: str, **runtime_options):
  """(unet, vae, text_encoder, tokenizer, schedule) from a converted SD directory (convert_weights.py output:
  unet/ vae/ text_encoder/ tokenizer/ and an optional scheduler_config.json, else SD-1.5's schedule)."""
  missing = [c for c in SD_COMPONENTS + ("tokenizer",) if not os.path.isdir(os.path.join(weights_dir, c))]
  if missing:
    present = sorted(os.listdir(weights_dir)) if os.path.isdir(weights_dir) else "no such directory"
    raise FileNotFoundError(f"{weights_dir}: not a converted SD directory, missing {missing} (has: {present})")
  unet, vae, text_encoder = (checkpoint.load_model(os.path.join(weights_dir, c), **runtime_options)
                             for c in SD_COMPONENTS)
  tokenizer = text.load_tokenizer(os.path.join(weights_dir, "tokenizer"))
  return unet, vae, text_encoder, tokenizer, make_schedule(load_schedule_config(weights_dir))


def _generate(unet, vae, contexts, key, noise, *, config: ScheduleConfig, sampler: str, steps: int,
              latent_shape: tuple[int, ...], guidance_scale: float, karras: bool, eta: float):
  denoise = sampling.cfg_denoiser(lambda x, t, context: unet(x, t, context), contexts, guidance_scale)
  latents = sampling.sample(denoise, key, schedule=make_schedule(config), sampler=sampler, steps=steps,
                            shape=latent_shape, karras=karras, eta=eta, noise=noise)
  images = vae.decode_latents(latents).astype(jnp.float32)
  return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)


_generate_jit = nnx.jit(_generate, static_argnames=("config", "sampler", "steps", "latent_shape",
                                                   "guidance_scale", "karras", "eta"))


def generate(unet, vae, text_encoder, tokenizer, prompt: str | Sequence[str], *, negative_prompt: str = "",
             steps: int = 20, sampler: str = "dpmpp_2m", guidance_scale: float = 7.5, seed: int = 0,
             height: int = 512, width: int = 512, schedule: NoiseSchedule | ScheduleConfig | None = None,
             karras: bool = False, eta: float = 0.0, noise: np.ndarray | None = None) -> np.ndarray:
  """(B, height, width, 3) float32 images in [0, 1] for a prompt (B = 1) or a list of prompts.

  noise: the starting latent noise (B, height/f, width/f, C) instead of one drawn from `seed`.
  """
  prompts = [prompt] if isinstance(prompt, str) else list(prompt)
  factor = vae.config.downscale
  # the U-Net halves the latents once per down block after the first
  multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
  if height % multiple or width % multiple or height <= 0 or width <= 0:
    raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
  config = schedule.config if isinstance(schedule, NoiseSchedule) else (schedule or ScheduleConfig())
  max_length = min(text.MAX_LENGTH, text_encoder.config.max_position_embeddings)
  embeddings = text.encode_prompts(text_encoder, tokenizer, [negative_prompt] + prompts, max_length=max_length)
  latent_shape = (len(prompts), height // factor, width // factor, vae.config.latent_channels)
  noise_key, step_key = jax.random.split(jax.random.key(seed))
  # drawn outside the compiled program, so seeded and given noise share one compile
  noise = jax.random.normal(noise_key, latent_shape) if noise is None else jnp.asarray(noise, jnp.float32)
  if noise.shape != latent_shape:
    raise ValueError(f"noise must have the latents' shape {latent_shape}, got {noise.shape}")
  images = _generate_jit(unet, vae, (embeddings[:1], embeddings[1:]), step_key, noise,
                         config=config, sampler=sampler, steps=int(steps), latent_shape=latent_shape,
                         guidance_scale=float(guidance_scale), karras=bool(karras), eta=float(eta))
  return np.asarray(images)


def text_to_image(unet, vae, text_encoder, tokenizer, prompt: str | Sequence[str], *, negative_prompt: str = "",
                  steps: int = 20, sampler: str = "dpmpp_2m", guidance_scale: float = 7.5, seed: int = 0,
                  height: int = 512, width: int = 512, schedule: NoiseSchedule | ScheduleConfig | None = None,
                  karras: bool = False, eta: float = 0.0) -> np.ndarray:
  """(B, height, width, 3) uint8 images for a prompt (B = 1) or a list of prompts (see `generate`)."""
  return image_ops.to_uint8(generate(
      unet, vae, text_encoder, tokenizer, prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler,
      guidance_scale=guidance_scale, seed=seed, height=height, width=width, schedule=schedule, karras=karras,
      eta=eta))
