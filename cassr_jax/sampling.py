"""The compiled denoising loop: one lax.scan over a sampler's host-computed plan, CFG as one doubled batch.

    denoise = cfg_denoiser(lambda x, t, ctx: unet(x, t, ctx), (negative, positive), guidance_scale=7.5)
    latents = jax.jit(lambda key: sample(denoise, key, schedule=schedule, shape=(1, 64, 64, 4)))(key)

`denoise(x, t)` returns the model output (epsilon or v, as schedule.prediction_type says) for latents x
(B, h, w, C) at integer timesteps t (B,). Every argument that shapes the loop (sampler, steps, strength,
karras, eta) is static; the loop itself runs inside one XLA while loop, so `sample` may be jitted whole.

`sample_images` is the one image-to-image run every super-resolver here uses (CasSRPipeline, the trainer's
validation preview, the SD-based stage-1 activations): per-image noise, the LR start, the loop, decode.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cassr_jax.registry import SAMPLERS
from cassr_jax.schedulers.base import Plan, Sampler
from cassr_jax.schedulers.schedule import NoiseSchedule

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def get_sampler(sampler: str | Sampler) -> Sampler:
  return sampler if isinstance(sampler, Sampler) else SAMPLERS.get(sampler)


def begin_for_strength(steps: int, strength: float) -> int:
  """First step index kept when only the last `strength` share of the steps runs (diffusers' img2img rule)."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  kept = min(int(steps * strength), steps)
  if kept < 1:
    raise ValueError(f"strength {strength} keeps no step out of {steps}; raise steps or strength")
  return steps - kept


def make_plan(sampler: str | Sampler, schedule: NoiseSchedule, steps: int, *, strength: float = 1.0,
              karras: bool = False, eta: float = 0.0) -> Plan:
  """The host-side tables of a run (the part of `sample` that is plain numpy)."""
  return get_sampler(sampler).make_plan(schedule, steps, begin=begin_for_strength(steps, strength),
                                        karras=karras, eta=eta)


def run_plan(sampler: str | Sampler, plan: Plan, denoise: Denoiser, x: jax.Array, *,
             key: jax.Array | None = None, noise: jax.Array | None = None,
             trajectory: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Runs every step of `plan` from latents x (already at the plan's first noise level).

  Noisy plans draw each step's noise from `key`, or take it from `noise` (len(plan), *x.shape).
  trajectory: also return the latents after every step, (len(plan), *x.shape).
  """
  sampler = get_sampler(sampler)
  n = len(plan)
  xs: dict[str, Any] = {"t": jnp.asarray(plan.timesteps, jnp.int32),
                        "row": {k: jnp.asarray(v, jnp.float32) for k, v in plan.table.items()}}
  if plan.noisy:
    if noise is not None:
      if noise.shape != (n, *x.shape):
        raise ValueError(f"noise must have shape {(n, *x.shape)} (steps, *latents), got {noise.shape}")
      xs["noise"] = noise.astype(x.dtype)
    elif key is not None:
      xs["key"] = jax.random.split(key, n)
    else:
      raise ValueError(f"the {sampler.name} plan adds noise at every step: pass key= or noise=")

  def body(carry, inputs):
    x, state = carry
    t = jnp.full((x.shape[0],), inputs["t"], jnp.int32)
    model_output = denoise(x, t).astype(x.dtype)
    if "key" in inputs:
      step_noise = jax.random.normal(inputs["key"], x.shape, x.dtype)
    else:
      step_noise = inputs.get("noise")
    x, state = sampler.step(plan, inputs["row"], x, model_output, state, step_noise)
    return (x, state), (x if trajectory else None)

  (x, _), path = jax.lax.scan(body, (x, sampler.init_state(x)), xs)
  return (x, path) if trajectory else x


def sample(denoise: Denoiser, key: jax.Array, *, schedule: NoiseSchedule, sampler: str | Sampler = "dpmpp_2m",
           steps: int = 20, shape: Sequence[int] | None = None, start_latents: jax.Array | None = None,
           strength: float = 1.0, karras: bool = False, eta: float = 0.0, noise: jax.Array | None = None,
           dtype=jnp.float32) -> jax.Array:
  """Latents denoised by `sampler` in `steps` steps (fewer when strength < 1).

  Starts from pure noise of `shape`, or from `start_latents` noised to the first step's level
  (x = alpha start + sigma eps; the LR start point of SeeSR / CasSR). strength < 1 (needs start_latents)
  skips the first (1 - strength) share of the steps, as img2img does. noise: the starting Gaussian noise
  (shaped like the latents) instead of one drawn from `key` (which then only drives stochastic steps).
  """
  if start_latents is None:
    if shape is None and noise is not None:
      shape = noise.shape
    if shape is None:
      raise ValueError("sample needs shape= (pure-noise start), noise= or start_latents=")
    if strength != 1.0:
      raise ValueError(f"strength={strength} needs start_latents (it says how far to noise them)")
  elif shape is not None and tuple(shape) != tuple(start_latents.shape):
    raise ValueError(f"shape {tuple(shape)} differs from start_latents' shape {tuple(start_latents.shape)}")
  sampler = get_sampler(sampler)
  plan = make_plan(sampler, schedule, steps, strength=strength, karras=karras, eta=eta)
  start_key, loop_key = jax.random.split(key)
  shape = tuple(shape if start_latents is None else start_latents.shape)
  if noise is not None and tuple(noise.shape) != shape:
    raise ValueError(f"noise has shape {tuple(noise.shape)}, the latents {shape}")
  eps = jax.random.normal(start_key, shape, dtype) if noise is None else noise.astype(dtype)
  if start_latents is None:
    x = eps  # every sampler here starts pure noise at unit scale (diffusers' init_noise_sigma = 1)
  else:
    x = plan.start_alpha * start_latents.astype(dtype) + plan.start_sigma * eps
  return run_plan(sampler, plan, denoise, x, key=loop_key if plan.noisy else None)


def sample_images(denoise: Denoiser, keys: jax.Array, plan: Plan, *, latent_shape: Sequence[int],
                  decode: Callable[[jax.Array], jax.Array], start_latents: jax.Array | None = None,
                  finish: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Images in [0, 1] sampled by `plan` (make_plan) with `denoise`, in float32.

  keys: (B,) typed PRNG keys, one per image (e.g. fold_in(key(seed), image id)); image i's start noise and
    every step's noise come from split(keys[i]) alone, so an image's result does not depend on batching.
  latent_shape: (h, w, C) of one image's latents.
  start_latents: (B, h, w, C) scaled latents of the start images (the VAE's encode_latents of the upsampled
    LR in [-1, 1], or a tiled version): sampling starts from them noised to the plan's first level (the LR
    start of SeeSR / CasSR; plan's strength says how far); None: from pure noise.
  decode: scaled latents -> images in [-1, 1] (the VAE's decode_latents or a tiled version).
  finish: images in [0, 1] -> the result (a colour fix, then the clip to [0, 1]); default: the clip.
  """
  latent_shape = tuple(latent_shape)
  pairs = jax.vmap(jax.random.split)(keys)
  start_keys, step_keys = pairs[:, 0], pairs[:, 1]
  eps = jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))(start_keys)
  if start_latents is None:
    x = eps
  else:
    x = plan.start_alpha * start_latents.astype(jnp.float32) + plan.start_sigma * eps
  step_noise = None
  if plan.noisy:  # per-image step noise, (steps, B, ...)
    step_noise = jax.vmap(lambda k: jax.random.normal(k, (len(plan),) + latent_shape, jnp.float32))(
        step_keys).swapaxes(0, 1)
  latents = run_plan(plan.sampler, plan, denoise, x, noise=step_noise)
  images = (decode(latents).astype(jnp.float32) + 1.0) * 0.5
  return jnp.clip(images, 0.0, 1.0) if finish is None else finish(images)


def cfg_denoiser(apply: Callable[..., jax.Array], contexts: tuple[jax.Array, jax.Array],
                 guidance_scale: float, extra: Sequence[Any] = ()) -> Denoiser:
  """Classifier-free guidance around apply(x, t, context, *extra) -> model output.

  contexts: (negative, positive) embeddings, (B, L, D) each (a batch-1 negative is broadcast). A scale of
  1.0 is the plain conditional call; otherwise one call on the doubled batch [negative; positive] (x, t and
  every array in `extra` repeated) and out = u + scale (c - u).
  """
  negative, positive = contexts
  extra = tuple(extra)
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
    return lambda x, t: apply(x, t, positive, *extra)
  if negative.shape[0] != positive.shape[0]:
    if negative.shape[0] != 1:
      raise ValueError(f"negative context batch {negative.shape[0]} must be 1 or match the positive's "
                       f"{positive.shape[0]}")
    negative = jnp.broadcast_to(negative, (positive.shape[0],) + negative.shape[1:])
  context = jnp.concatenate([negative, positive.astype(negative.dtype)], axis=0)
  doubled_extra = jax.tree.map(lambda e: jnp.concatenate([e, e], axis=0), extra)

  def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
    out = apply(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), context, *doubled_extra)
    uncond, cond = jnp.split(out, 2, axis=0)
    return uncond + guidance_scale * (cond - uncond)

  return denoise
