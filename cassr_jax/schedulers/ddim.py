"""DDIM (Song et al. 2021), as diffusers' DDIMScheduler: deterministic for eta = 0, DDPM-like noise for eta > 0.

Like diffusers, the step goes from t to t - num_train_timesteps // steps whatever the spacing, and the last
step lands on abar = 1 (set_alpha_to_one) or abar[0].
"""
from __future__ import annotations

import jax
import numpy as np

from cassr_jax.schedulers import base
from cassr_jax.schedulers.schedule import NoiseSchedule, inference_timesteps


def make_plan(schedule: NoiseSchedule, steps: int, *, begin: int = 0, karras: bool = False,
              eta: float = 0.0) -> base.Plan:
  if karras:
    raise ValueError("ddim does not support karras sigmas (use dpmpp_2m or unipc)")
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  config = schedule.config
  timesteps = inference_timesteps(config, steps, spacing=base.spacing_for(schedule, "leading"), multistep=False)
  begin = base.begin_index(len(timesteps), begin)
  abar = schedule.alphas_cumprod
  final = 1.0 if config.set_alpha_to_one else abar[0]
  prev = timesteps - config.num_train_timesteps // steps
  abar_t = abar[timesteps]
  abar_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
  variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
  std = eta * np.sqrt(variance)
  table = dict(alpha=np.sqrt(abar_t), sigma=np.sqrt(1 - abar_t), alpha_prev=np.sqrt(abar_prev),
               direction=np.sqrt(np.maximum(1 - abar_prev - std ** 2, 0.0)), std=std)
  return base.Plan("ddim", timesteps[begin:].astype(np.int32), base.rows(table, begin),
                   start_alpha=float(table["alpha"][begin]), start_sigma=float(table["sigma"][begin]),
                   prediction_type=schedule.prediction_type, noisy=eta > 0,
                   clip_range=config.clip_sample_range if config.clip_sample else None)


def step(plan: base.Plan, row, x: jax.Array, model_output: jax.Array, state, noise):
  x0, eps = base.x0_and_eps(plan.prediction_type, x, model_output, row["alpha"], row["sigma"])
  x0 = base.maybe_clip(plan, x0)
  out = row["alpha_prev"] * x0 + row["direction"] * eps
  if plan.noisy:
    out = out + row["std"] * noise
  return out, state


SAMPLER = base.Sampler("ddim", make_plan, base.no_state, step, stochastic=True)
